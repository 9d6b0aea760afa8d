//! The live object model: what every reactor shares about targets, portal groups and
//! initiator groups ([`Model`], immutable once built), the session registry ([`Registry`]),
//! and the SCSI devices built from the configuration ([`build_devices`]), each of which is
//! then owned by one reactor.

use super::{BdevConfig, BdevKind, Config, FileEngine, InitiatorGroup, Netmask, TargetNode};
use crate::bdev::uring::{UringBdev, UringOptions};
use crate::bdev::{file::FileBdev, malloc::MallocBdev, null::NullBdev, BlockDevice};
use crate::iscsi::params::SessionParams;
use crate::iscsi::{
    DiscoveryEntry, Joined, LoginStatus, Registered, SessionKey, TargetId, TargetInfo,
};
use crate::scsi::{Device, LunIdentity, NexusId};
use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// Errors building the live model from a configuration.
#[derive(Debug)]
pub enum BuildError {
    Bdev {
        name: String,
        error: String,
    },
    Lun {
        target: String,
        lun: u64,
        error: String,
    },
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Bdev { name, error } => write!(f, "bdev {name}: {error}"),
            BuildError::Lun { target, lun, error } => {
                write!(f, "target {target} LUN {lun}: {error}")
            }
        }
    }
}

impl std::error::Error for BuildError {}

/// Opens the block device a configuration entry describes.
pub fn open_bdev(cfg: &BdevConfig) -> Result<Box<dyn BlockDevice>, BuildError> {
    let err = |e: crate::bdev::BdevError| BuildError::Bdev {
        name: cfg.name.clone(),
        error: e.to_string(),
    };
    Ok(match &cfg.kind {
        BdevKind::Malloc { size } => {
            Box::new(MallocBdev::new(&cfg.name, cfg.block_size, *size).map_err(err)?)
        }
        BdevKind::Null { size } => {
            Box::new(NullBdev::new(&cfg.name, cfg.block_size, *size).map_err(err)?)
        }
        BdevKind::File {
            path,
            size,
            engine: FileEngine::Threads,
            ..
        } => Box::new(FileBdev::open(&cfg.name, path, cfg.block_size, *size).map_err(err)?),
        BdevKind::File {
            path,
            size,
            engine: FileEngine::Uring,
            direct,
        } => {
            let opts = UringOptions {
                direct: *direct,
                ..UringOptions::default()
            };
            Box::new(UringBdev::open(&cfg.name, path, cfg.block_size, *size, opts).map_err(err)?)
        }
    })
}

/// A stable 24-bit value from a string (FNV-1a), for identifiers derived from names.
fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The identity a LUN reports: derived from the target and bdev names so it stays the same
/// across restarts (initiators and multipath key on it).
pub fn lun_identity(target: &TargetNode, lun: u64, bdev: &str, state_dir: &str) -> LunIdentity {
    let h = fnv(&format!("{}/{}/{}", target.name, lun, bdev));
    // NAA 6 (IEEE registered extended) would need an OUI; NAA 5 with a locally assigned
    // company id keeps the format valid: 5 | 24-bit id | 36-bit vendor specific.
    let naa = (0x5u64 << 60) | (0x00_1405u64 << 36) | (h & 0x0f_ffff_ffff);
    LunIdentity {
        vendor: "RUSTIO".into(),
        product: "iscsi-tgt".into(),
        revision: "0001".into(),
        serial: format!("{:016x}", h),
        naa,
        target_name: target.name.clone(),
        pr_file: Some(pr_file(state_dir, &target.name, lun)),
    }
}

/// Where a LUN's persistent reservations are kept while an initiator asks for them to
/// persist through power loss: `<state_dir>/pr/<target name>/lun<N>.json`.
pub fn pr_file(state_dir: &str, target: &str, lun: u64) -> std::path::PathBuf {
    std::path::Path::new(state_dir)
        .join("pr")
        .join(target)
        .join(format!("lun{lun}.json"))
}

fn name_matches(pattern: &str, initiator: &str) -> bool {
    pattern.eq_ignore_ascii_case("ANY") || pattern.eq_ignore_ascii_case(initiator)
}

fn in_netmask(mask: &Netmask, ip: IpAddr) -> bool {
    let ip = match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    };
    match *mask {
        Netmask::Any => true,
        Netmask::Cidr { addr, prefix } => match (addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(prefix.min(32)))
                };
                u32::from(a) & m == u32::from(b) & m
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let m = if prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(prefix.min(128)))
                };
                u128::from(a) & m == u128::from(b) & m
            }
            _ => false,
        },
    }
}

/// Whether an initiator group admits this initiator from this address.
pub fn group_allows(group: &InitiatorGroup, initiator: &str, peer: IpAddr) -> bool {
    let denied = group.initiators.iter().any(|p| {
        p.strip_prefix('!')
            .is_some_and(|n| name_matches(n, initiator))
    });
    if denied {
        return false;
    }
    let named = group
        .initiators
        .iter()
        .any(|p| !p.starts_with('!') && name_matches(p, initiator));
    named && group.netmasks.iter().any(|m| in_netmask(m, peer))
}

/// Open bdevs no LUN uses, by name.
pub type SpareBdevs = HashMap<String, Box<dyn BlockDevice>>;

/// Builds one SCSI device per target node (index = [`TargetId`]), opening every bdev; the
/// bdevs no LUN uses come back beside them.
pub fn build_devices(config: &Config) -> Result<(Vec<Device>, SpareBdevs), BuildError> {
    let mut bdevs: SpareBdevs = HashMap::new();
    for b in &config.bdevs {
        bdevs.insert(b.name.clone(), open_bdev(b)?);
    }
    let devices = config
        .targets
        .iter()
        .map(|node| build_device(node, &config.global.state_dir, &mut bdevs))
        .collect::<Result<_, _>>()?;
    Ok((devices, bdevs))
}

/// Builds the SCSI device of one target from opened bdevs (taking the ones it uses).
pub fn build_device(
    node: &TargetNode,
    state_dir: &str,
    bdevs: &mut HashMap<String, Box<dyn BlockDevice>>,
) -> Result<Device, BuildError> {
    {
        let mut device = Device::new();
        device.set_ports(node.mappings.iter().map(|m| m.portal_group).collect());
        for l in &node.luns {
            let bdev = bdevs.remove(&l.bdev).ok_or_else(|| BuildError::Lun {
                target: node.name.clone(),
                lun: l.lun,
                error: format!("bdev {} is missing or already used", l.bdev),
            })?;
            let ident = lun_identity(node, l.lun, &l.bdev, state_dir);
            device
                .add_lun(l.lun, bdev, ident)
                .map_err(|error| BuildError::Lun {
                    target: node.name.clone(),
                    lun: l.lun,
                    error,
                })?;
        }
        Ok(device)
    }
}

/// What every reactor needs to know about targets and access rules. Immutable once built,
/// so reactors share it without locks.
///
/// Targets are never renumbered: a removed target stays in `config.targets` as a tombstone
/// (its [`TargetId`] is the index, and the id picks the reactor its device lives on), and
/// every lookup skips it.
#[derive(Debug, Clone)]
pub struct Model {
    config: Config,
    removed: Vec<bool>,
    /// Bumped by every change: a reactor never replaces its model by an older one (changes
    /// reach it from different reactors, in any order).
    pub version: u64,
}

impl Model {
    pub fn new(config: Config) -> Self {
        let removed = vec![false; config.targets.len()];
        Model {
            config,
            removed,
            version: 0,
        }
    }

    /// Whether target `id` exists (and was not removed).
    pub fn is_live(&self, id: TargetId) -> bool {
        id < self.config.targets.len() && !self.removed.get(id).copied().unwrap_or(false)
    }

    /// The targets that exist, with their ids.
    pub fn live_targets(&self) -> impl Iterator<Item = (TargetId, &TargetNode)> {
        self.config
            .targets
            .iter()
            .enumerate()
            .filter(|(id, _)| self.is_live(*id))
    }

    /// The configuration as it stands now: removed targets left out.
    pub fn current_config(&self) -> Config {
        let mut c = self.config.clone();
        c.targets = self.live_targets().map(|(_, t)| t.clone()).collect();
        c
    }

    /// The live target named `name` (case-insensitive).
    pub fn find_target(&self, name: &str) -> Option<(TargetId, &TargetNode)> {
        self.live_targets()
            .find(|(_, t)| t.name.eq_ignore_ascii_case(name))
    }

    /// This model plus a target and its bdevs; the new target's id.
    pub fn with_target(
        &self,
        node: TargetNode,
        bdevs: Vec<super::BdevConfig>,
    ) -> (Model, TargetId) {
        let mut m = self.clone();
        m.config.bdevs.extend(bdevs);
        m.config.targets.push(node);
        m.removed.push(false);
        m.version += 1;
        (m, self.config.targets.len())
    }

    /// This model without target `id` (its bdevs go with it).
    pub fn without_target(&self, id: TargetId) -> Model {
        let mut m = self.clone();
        m.version += 1;
        if let Some(r) = m.removed.get_mut(id) {
            *r = true;
        }
        if let Some(t) = m.config.targets.get(id) {
            let gone: Vec<String> = t.luns.iter().map(|l| l.bdev.clone()).collect();
            m.config.bdevs.retain(|b| !gone.contains(&b.name));
        }
        m
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn global(&self) -> &super::Global {
        &self.config.global
    }

    pub fn target_count(&self) -> usize {
        self.config.targets.len()
    }

    fn may_access(
        &self,
        node: &TargetNode,
        initiator: &str,
        peer: IpAddr,
        pg_tag: Option<u16>,
    ) -> bool {
        node.mappings.iter().any(|m| {
            pg_tag.is_none_or(|t| t == m.portal_group)
                && self
                    .config
                    .initiator_groups
                    .iter()
                    .find(|g| g.tag == m.initiator_group)
                    .is_some_and(|g| group_allows(g, initiator, peer))
        })
    }

    fn addresses_of(&self, node: &TargetNode, local: SocketAddr) -> Vec<String> {
        let mut out = Vec::new();
        for m in &node.mappings {
            if let Some(pg) = self
                .config
                .portal_groups
                .iter()
                .find(|p| p.tag == m.portal_group)
            {
                for p in &pg.portals {
                    // A wildcard portal is reported as the address the initiator reached.
                    let addr = if p.ip().is_unspecified() {
                        SocketAddr::new(local.ip(), p.port())
                    } else {
                        *p
                    };
                    let s = format!("{},{}", addr, pg.tag);
                    if !out.contains(&s) {
                        out.push(s);
                    }
                }
            }
        }
        out
    }

    /// Finds the target an initiator asks for through portal group `pg_tag`.
    pub fn login_target(
        &self,
        name: &str,
        initiator: &str,
        peer: SocketAddr,
        pg_tag: u16,
    ) -> Result<TargetInfo, LoginStatus> {
        let (id, node) = self.find_target(name).ok_or(LoginStatus::NOT_FOUND)?;
        if !node.mappings.iter().any(|m| m.portal_group == pg_tag) {
            // Not exposed on this portal: indistinguishable from not existing.
            return Err(LoginStatus::NOT_FOUND);
        }
        if !self.may_access(node, initiator, peer.ip(), Some(pg_tag)) {
            return Err(LoginStatus::AUTHORIZATION_FAILED);
        }
        Ok(TargetInfo {
            id,
            name: node.name.clone(),
            alias: node.alias.clone(),
            queue_depth: node.queue_depth,
        })
    }

    /// SendTargets: the targets this initiator may see, with every portal of each.
    pub fn discover(
        &self,
        initiator: &str,
        peer: SocketAddr,
        local: SocketAddr,
        only: Option<&str>,
    ) -> Vec<DiscoveryEntry> {
        self.live_targets()
            .map(|(_, t)| t)
            .filter(|t| only.is_none_or(|n| t.name.eq_ignore_ascii_case(n)))
            .filter(|t| self.may_access(t, initiator, peer.ip(), None))
            .map(|t| DiscoveryEntry {
                name: t.name.clone(),
                addresses: self.addresses_of(t, local),
            })
            .collect()
    }

    /// How logins to target `target` (None: discovery sessions) authenticate.
    pub fn auth_policy(&self, target: Option<TargetId>) -> crate::iscsi::chap::AuthPolicy {
        use crate::iscsi::chap::{AuthPolicy, ChapMode};
        let a = match target {
            Some(t) => match self.config.targets.get(t) {
                Some(node) => node.auth,
                None => return AuthPolicy::default(),
            },
            None => self.config.discovery_auth,
        };
        let mode = if a.disable_chap {
            ChapMode::Disabled
        } else if a.require_chap || a.mutual_chap {
            ChapMode::Required
        } else if a.group.is_some() {
            ChapMode::Optional
        } else {
            ChapMode::Disabled
        };
        AuthPolicy {
            mode,
            mutual: a.mutual_chap,
            secrets: a
                .group
                .and_then(|g| self.config.auth_groups.iter().find(|x| x.tag == g))
                .map(|g| g.secrets.clone())
                .unwrap_or_default(),
        }
    }

    pub fn lun_exists(&self, target: TargetId, lun: u64) -> bool {
        self.is_live(target)
            && self
                .config
                .targets
                .get(target)
                .is_some_and(|t| t.luns.iter().any(|l| l.lun == lun))
    }
}

/// A LUN a home reactor installs before the new model reaches the other reactors.
#[derive(Debug, Clone, PartialEq)]
pub struct LunAdd {
    pub target: TargetId,
    pub lun: u64,
    pub bdev: String,
    pub identity: LunIdentity,
    /// The LUN exists on another (or a reopened) bdev: the home swaps them when the new
    /// model arrives, so commands sent before that still reach the old one.
    pub replace: bool,
}

/// What bringing the running model to a desired configuration takes: the new model, what
/// the home reactors must prepare for it, and a line per change for the operator. LUNs and
/// targets the new model no longer has are removed by their home reactors when it arrives.
#[derive(Debug)]
pub struct Plan {
    pub model: Model,
    /// One line per change, in the order they are listed.
    pub changes: Vec<String>,
    /// Settings that differ but take effect only at a restart (the model keeps the
    /// running values).
    pub restart: Vec<String>,
    /// Bdevs to open: new ones, and ones whose definition changed other than in size.
    pub open: Vec<BdevConfig>,
    /// Bdevs resized in place: name, new size in blocks.
    pub resize: Vec<(String, u64)>,
    pub luns: Vec<LunAdd>,
    /// Kernel portals to open, to close, and to hand to another portal group.
    pub portals_add: Vec<(SocketAddr, u16)>,
    pub portals_del: Vec<SocketAddr>,
    pub portals_retag: Vec<(SocketAddr, u16)>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

/// Which live target of `model` maps bdev `name`, and as which LUN.
fn bdev_user<'a>(model: &'a Model, name: &str) -> Option<(TargetId, &'a TargetNode, u64)> {
    model.live_targets().find_map(|(id, t)| {
        t.luns
            .iter()
            .find(|l| l.bdev == name)
            .map(|l| (id, t, l.lun))
    })
}

/// The same bdev apart from its size: the new size in blocks.
fn only_size_differs(old: &BdevConfig, new: &BdevConfig) -> Option<u64> {
    if old.name != new.name || old.block_size != new.block_size {
        return None;
    }
    let bs = u64::from(new.block_size);
    match (&old.kind, &new.kind) {
        (BdevKind::Malloc { .. }, BdevKind::Malloc { size })
        | (BdevKind::Null { .. }, BdevKind::Null { size }) => Some(size / bs),
        (
            BdevKind::File {
                path: p0,
                engine: e0,
                direct: d0,
                ..
            },
            BdevKind::File {
                path,
                size: Some(size),
                engine,
                direct,
            },
        ) if p0 == path && e0 == engine && d0 == direct => Some(size / bs),
        _ => None,
    }
}

/// Global settings that only a restart changes (threads, memory, timers set up at start).
fn restart_only(cur: &super::Global, new: &mut super::Global, out: &mut Vec<String>) {
    macro_rules! keep {
        ($($f:ident),*) => {$(
            if cur.$f != new.$f {
                out.push(format!(
                    "global.{}: {:?} -> {:?} (restart to apply)",
                    stringify!($f), cur.$f, new.$f
                ));
                new.$f = cur.$f.clone();
            }
        )*};
    }
    keep!(
        instance,
        state_dir,
        cpumask,
        buffer_pool_mib,
        hugepages,
        poll_spin_us,
        idle_park_ms,
        nop_in_interval_s,
        nop_in_timeout_s,
        login_timeout_s,
        pdu_timeout_s,
        max_connection_buffer_mib
    );
}

/// Global settings read at each login or command: they change at once.
fn live_globals(cur: &super::Global, new: &super::Global, out: &mut Vec<String>) {
    macro_rules! diff {
        ($($f:ident),*) => {$(
            if cur.$f != new.$f {
                out.push(format!("global.{}: {:?} -> {:?}", stringify!($f), cur.$f, new.$f));
            }
        )*};
    }
    diff!(
        log_level,
        max_recv_data_segment_length,
        max_burst_length,
        first_burst_length,
        max_outstanding_r2t,
        immediate_data,
        initial_r2t,
        default_time2wait,
        default_time2retain,
        error_recovery_level,
        max_connections,
        max_sessions,
        header_digest,
        data_digest,
        max_connections_per_address,
        max_sessions_per_target,
        max_sessions_per_initiator,
        max_connections_per_portal_group
    );
}

/// Works out how to bring `current` to `desired` (a validated configuration). Targets keep
/// their ids (matched by name); userspace portal groups cannot change at run time, and a
/// bdev cannot move from one LUN to another in one step (it is busy until its old LUN has
/// finished its commands).
pub fn plan(current: &Model, desired: &Config) -> Result<Plan, String> {
    let cur = &current.config;
    let mut changes = Vec::new();
    let mut restart = Vec::new();

    let mut global = desired.global.clone();
    restart_only(&cur.global, &mut global, &mut restart);
    live_globals(&cur.global, &global, &mut changes);
    if desired.dpdk != cur.dpdk {
        restart.push("[dpdk]: changed (restart to apply)".into());
    }

    // Portal groups. Userspace ones are built into the reactors at start.
    let tags: std::collections::BTreeSet<u16> = cur
        .portal_groups
        .iter()
        .chain(&desired.portal_groups)
        .map(|p| p.tag)
        .collect();
    for tag in tags {
        let old = cur.portal_groups.iter().find(|p| p.tag == tag);
        let new = desired.portal_groups.iter().find(|p| p.tag == tag);
        let user = |p: Option<&super::PortalGroup>| {
            p.is_some_and(|p| p.transport != super::Transport::Kernel)
        };
        if (user(old) || user(new)) && old != new {
            return Err(format!(
                "portal group {tag}: userspace portal groups (tap, dpdk) change only with a restart"
            ));
        }
        let list = |p: &super::PortalGroup| {
            p.portals
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        match (old, new) {
            (None, Some(n)) => changes.push(format!("portal group {tag} added ({})", list(n))),
            (Some(_), None) => changes.push(format!("portal group {tag} removed")),
            (Some(o), Some(n)) if o != n => changes.push(format!(
                "portal group {tag}: portals {} -> {}",
                list(o),
                list(n)
            )),
            _ => {}
        }
    }
    let kernel_portals = |c: &Config| -> HashMap<SocketAddr, u16> {
        c.portal_groups
            .iter()
            .filter(|p| p.transport == super::Transport::Kernel)
            .flat_map(|p| p.portals.iter().map(move |a| (*a, p.tag)))
            .collect()
    };
    let (old_portals, new_portals) = (kernel_portals(cur), kernel_portals(desired));
    let mut portals_add: Vec<(SocketAddr, u16)> = Vec::new();
    let mut portals_retag = Vec::new();
    for (a, t) in &new_portals {
        match old_portals.get(a) {
            None => portals_add.push((*a, *t)),
            Some(o) if o != t => portals_retag.push((*a, *t)),
            _ => {}
        }
    }
    let mut portals_del: Vec<SocketAddr> = old_portals
        .keys()
        .filter(|a| !new_portals.contains_key(a))
        .copied()
        .collect();
    portals_add.sort();
    portals_del.sort();
    portals_retag.sort();

    // Initiator groups: rules only, read at each login and discovery.
    let tags: std::collections::BTreeSet<u16> = cur
        .initiator_groups
        .iter()
        .chain(&desired.initiator_groups)
        .map(|g| g.tag)
        .collect();
    for tag in tags {
        let old = cur.initiator_groups.iter().find(|g| g.tag == tag);
        let new = desired.initiator_groups.iter().find(|g| g.tag == tag);
        match (old, new) {
            (None, Some(_)) => changes.push(format!("initiator group {tag} added")),
            (Some(_), None) => changes.push(format!("initiator group {tag} removed")),
            (Some(o), Some(n)) if o != n => {
                changes.push(format!("initiator group {tag} changed (new logins)"))
            }
            _ => {}
        }
    }

    // Auth groups and discovery's authentication: read at each login.
    let tags: std::collections::BTreeSet<u16> = cur
        .auth_groups
        .iter()
        .chain(&desired.auth_groups)
        .map(|g| g.tag)
        .collect();
    for tag in tags {
        let old = cur.auth_groups.iter().find(|g| g.tag == tag);
        let new = desired.auth_groups.iter().find(|g| g.tag == tag);
        match (old, new) {
            (None, Some(_)) => changes.push(format!("auth group {tag} added")),
            (Some(_), None) => changes.push(format!("auth group {tag} removed")),
            (Some(o), Some(n)) if o != n => {
                changes.push(format!("auth group {tag} changed (new logins)"))
            }
            _ => {}
        }
    }
    if cur.discovery_auth != desired.discovery_auth {
        changes.push("discovery authentication changed (new logins)".into());
    }

    // Bdevs.
    let mut open = Vec::new();
    let mut resize = Vec::new();
    for b in &desired.bdevs {
        match cur.bdevs.iter().find(|o| o.name == b.name) {
            None => {
                changes.push(format!("bdev {} added", b.name));
                open.push(b.clone());
            }
            Some(o) if o == b => {}
            Some(o) => match only_size_differs(o, b) {
                Some(blocks) => {
                    changes.push(format!(
                        "bdev {} resized to {} bytes",
                        b.name,
                        blocks * u64::from(b.block_size)
                    ));
                    resize.push((b.name.clone(), blocks));
                }
                None => {
                    if o.block_size != b.block_size && bdev_user(current, &b.name).is_some() {
                        return Err(format!(
                            "bdev {}: the block size of a LUN in use cannot change (remove \
                             the LUN first)",
                            b.name
                        ));
                    }
                    changes.push(format!("bdev {} redefined (reopened)", b.name));
                    open.push(b.clone());
                }
            },
        }
    }
    for o in &cur.bdevs {
        if !desired.bdevs.iter().any(|b| b.name == o.name) {
            changes.push(format!("bdev {} removed", o.name));
        }
    }
    let reopened = |name: &str| open.iter().any(|b: &BdevConfig| b.name == name);

    // Targets keep their ids; removed ones stay as tombstones.
    let mut model = current.clone();
    model.version = current.version + 1;
    model.config = Config {
        global,
        dpdk: cur.dpdk.clone(),
        targets: Vec::new(),
        ..desired.clone()
    };
    model.config.targets = cur.targets.clone();
    let mut luns = Vec::new();
    // The running state directory (a new one takes a restart).
    let state_dir = cur.global.state_dir.clone();
    let mut lun_add = |id: TargetId, node: &TargetNode, lun: u64, bdev: &str, replace: bool| {
        let add = LunAdd {
            target: id,
            lun,
            bdev: bdev.to_string(),
            identity: lun_identity(node, lun, bdev, &state_dir),
            replace,
        };
        if !reopened(bdev) {
            if let Some((uid, user, ulun)) = bdev_user(current, bdev) {
                if (uid, ulun) != (id, lun) {
                    return Err(format!(
                        "bdev {bdev} backs LUN {ulun} of {}: remove that LUN first, then map \
                         the bdev again (it is busy until its commands have finished)",
                        user.name
                    ));
                }
            }
        }
        luns.push(add);
        Ok(())
    };
    for (id, old) in current.live_targets() {
        let Some(new) = desired
            .targets
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(&old.name))
        else {
            changes.push(format!("target {} removed", old.name));
            model.removed[id] = true;
            continue;
        };
        for l in &old.luns {
            if !new.luns.iter().any(|n| n.lun == l.lun) {
                changes.push(format!("target {}: LUN {} removed", old.name, l.lun));
            }
        }
        for l in &new.luns {
            match old.luns.iter().find(|o| o.lun == l.lun) {
                None => {
                    changes.push(format!(
                        "target {}: LUN {} added (bdev {})",
                        new.name, l.lun, l.bdev
                    ));
                    lun_add(id, new, l.lun, &l.bdev, false)?;
                }
                Some(o) if o.bdev != l.bdev || reopened(&l.bdev) => {
                    changes.push(format!(
                        "target {}: LUN {} now on bdev {}",
                        new.name, l.lun, l.bdev
                    ));
                    lun_add(id, new, l.lun, &l.bdev, true)?;
                }
                Some(_) => {}
            }
        }
        if old.mappings != new.mappings {
            changes.push(format!("target {}: mappings changed", new.name));
        }
        if old.alias != new.alias {
            changes.push(format!("target {}: alias {:?}", new.name, new.alias));
        }
        if old.auth != new.auth {
            changes.push(format!(
                "target {}: authentication changed (new logins)",
                new.name
            ));
        }
        if old.queue_depth != new.queue_depth {
            changes.push(format!(
                "target {}: queue_depth {} -> {} (new sessions)",
                new.name, old.queue_depth, new.queue_depth
            ));
        }
        model.config.targets[id] = new.clone();
    }
    for new in &desired.targets {
        if current.find_target(&new.name).is_some() {
            continue;
        }
        let id = model.config.targets.len();
        model.config.targets.push(new.clone());
        model.removed.push(false);
        changes.push(format!("target {} added", new.name));
        for l in &new.luns {
            lun_add(id, new, l.lun, &l.bdev, false)?;
        }
    }
    changes.extend(restart.iter().cloned());
    Ok(Plan {
        model,
        changes,
        restart,
        open,
        resize,
        luns,
        portals_add,
        portals_del,
        portals_retag,
    })
}

/// Caps on sessions (0: no limit): in all, per target, per initiator name.
#[derive(Debug, Clone, Copy, Default)]
pub struct SessionLimits {
    pub total: u32,
    pub per_target: u32,
    pub per_initiator: u32,
}

impl SessionLimits {
    pub fn of(g: &super::Global) -> Self {
        SessionLimits {
            total: g.max_sessions,
            per_target: g.max_sessions_per_target,
            per_initiator: g.max_sessions_per_initiator,
        }
    }
}

struct SessionEntry {
    key: SessionKey,
    /// Connections (CID, uid), the leading one first.
    conns: Vec<(u16, u64)>,
    /// The reactor all its connections live on.
    reactor: usize,
    params: SessionParams,
    nexus: NexusId,
}

/// A new session's registration details beyond its key.
pub struct NewSession<'a> {
    pub conn_uid: u64,
    pub cid: u16,
    pub reactor: usize,
    pub params: &'a SessionParams,
    pub nexus: NexusId,
}

/// The sessions of the whole dataplane: TSIH allocation and reinstatement by ISID.
#[derive(Default)]
pub struct Registry {
    sessions: HashMap<u16, SessionEntry>,
    next_tsih: u16,
}

impl Registry {
    pub fn new() -> Self {
        Registry {
            sessions: HashMap::new(),
            next_tsih: 1,
        }
    }

    /// Registers a new session; an existing session with the same key is reinstated (its
    /// connection is named in the result so the caller can close it).
    pub fn register(
        &mut self,
        key: SessionKey,
        new: NewSession<'_>,
        limits: SessionLimits,
    ) -> Result<Registered, LoginStatus> {
        let SessionLimits {
            total: max_sessions,
            per_target: max_per_target,
            per_initiator: max_per_initiator,
        } = limits;
        let mut reinstated = Vec::new();
        let mut ended = None;
        if let Some((&old_tsih, old)) = self.sessions.iter().find(|(_, s)| s.key == key) {
            reinstated = old.conns.iter().map(|(_, uid)| *uid).collect();
            ended = Some((old_tsih, old.key.target, old.nexus));
            self.sessions.remove(&old_tsih);
        }
        let reinstating = ended.is_some();
        if !reinstating && self.sessions.len() >= max_sessions as usize {
            return Err(LoginStatus::OUT_OF_RESOURCES);
        }
        if !reinstating && max_per_target > 0 && key.target.is_some() {
            let on_target = self
                .sessions
                .values()
                .filter(|s| s.key.target == key.target)
                .count();
            if on_target >= max_per_target as usize {
                return Err(LoginStatus::OUT_OF_RESOURCES);
            }
        }
        if !reinstating && max_per_initiator > 0 {
            let by_initiator = self
                .sessions
                .values()
                .filter(|s| s.key.initiator == key.initiator)
                .count();
            if by_initiator >= max_per_initiator as usize {
                return Err(LoginStatus::OUT_OF_RESOURCES);
            }
        }
        let mut tsih = self.next_tsih;
        while tsih == 0 || self.sessions.contains_key(&tsih) {
            tsih = tsih.wrapping_add(1);
        }
        self.next_tsih = tsih.wrapping_add(1);
        self.sessions.insert(
            tsih,
            SessionEntry {
                key,
                conns: vec![(new.cid, new.conn_uid)],
                reactor: new.reactor,
                params: new.params.clone(),
                nexus: new.nexus,
            },
        );
        Ok(Registered {
            tsih,
            reinstated,
            ended,
        })
    }

    /// Every session: TSIH, key, leading connection.
    pub fn list(&self) -> Vec<(u16, SessionKey, u64)> {
        let mut v: Vec<_> = self
            .sessions
            .iter()
            .map(|(t, s)| (*t, s.key.clone(), s.conns.first().map_or(0, |c| c.1)))
            .collect();
        v.sort_by_key(|(t, _, _)| *t);
        v
    }

    pub fn exists(&self, tsih: u16) -> bool {
        self.sessions.contains_key(&tsih)
    }

    /// Whether a login with `key` may add connection `cid` to session `tsih` (RFC 7143
    /// §6.3.4): the session must exist and be this initiator's (same name, ISID, target);
    /// a CID in use is replaced (connection reinstatement), otherwise MaxConnections bounds.
    pub fn may_join(
        &self,
        tsih: u16,
        key: &SessionKey,
        cid: u16,
    ) -> Result<&SessionParams, LoginStatus> {
        let s = self
            .sessions
            .get(&tsih)
            .filter(|s| s.key == *key)
            .ok_or(LoginStatus::SESSION_DOES_NOT_EXIST)?;
        let replacing = s.conns.iter().any(|(c, _)| *c == cid);
        if !replacing && s.conns.len() >= s.params.max_connections.max(1) as usize {
            return Err(LoginStatus::TOO_MANY_CONNECTIONS);
        }
        Ok(&s.params)
    }

    /// Adds connection `conn_uid` to session `tsih` (see [`Registry::may_join`]).
    pub fn join(
        &mut self,
        tsih: u16,
        key: &SessionKey,
        cid: u16,
        conn_uid: u64,
    ) -> Result<Joined, LoginStatus> {
        self.may_join(tsih, key, cid)?;
        let s = self
            .sessions
            .get_mut(&tsih)
            .ok_or(LoginStatus::SESSION_DOES_NOT_EXIST)?;
        let replaced = s
            .conns
            .iter()
            .position(|(c, _)| *c == cid)
            .map(|i| s.conns.remove(i).1);
        s.conns.push((cid, conn_uid));
        Ok(Joined {
            reactor: s.reactor,
            params: s.params.clone(),
            nexus: s.nexus,
            replaced,
        })
    }

    /// Connection `conn_uid` of session `tsih` failed at ERL 2: it leaves the session,
    /// which stays (even without connections) for the failed connection's tasks to be
    /// reassigned; [`Registry::end_if_empty`] ends it later.
    pub fn suspend(&mut self, tsih: u16, conn_uid: u64) {
        if let Some(s) = self.sessions.get_mut(&tsih) {
            s.conns.retain(|(_, uid)| *uid != conn_uid);
        }
    }

    /// Ends session `tsih` if no connection came back; returns its target and I_T nexus
    /// when it ended.
    pub fn end_if_empty(&mut self, tsih: u16) -> Option<(Option<TargetId>, NexusId)> {
        if self.sessions.get(&tsih).is_some_and(|s| s.conns.is_empty()) {
            let s = self.sessions.remove(&tsih)?;
            return Some((s.key.target, s.nexus));
        }
        None
    }

    pub fn has_cid(&self, tsih: u16, cid: u16) -> bool {
        self.sessions
            .get(&tsih)
            .is_some_and(|s| s.conns.iter().any(|(c, _)| *c == cid))
    }

    /// Connection `conn_uid` of session `tsih` is gone; the session ends with its last
    /// connection. False only when the session ended now: true when it lives on with
    /// other connections, or the connection was no longer part of it (replaced by a
    /// connection with its CID, or its session reinstated, which ended it then).
    pub fn unregister(&mut self, tsih: u16, conn_uid: u64) -> bool {
        let Some(s) = self.sessions.get_mut(&tsih) else {
            return true;
        };
        let before = s.conns.len();
        s.conns.retain(|(_, uid)| *uid != conn_uid);
        if s.conns.len() == before {
            return true;
        }
        if s.conns.is_empty() {
            self.sessions.remove(&tsih);
            return false;
        }
        true
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(inits: &[&str], masks: Vec<Netmask>) -> InitiatorGroup {
        InitiatorGroup {
            tag: 1,
            initiators: inits.iter().map(|s| s.to_string()).collect(),
            netmasks: masks,
        }
    }

    #[test]
    fn initiator_groups() {
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        let g = group(&["ANY"], vec![Netmask::Any]);
        assert!(group_allows(&g, "iqn.a", lo));
        let g = group(&["ANY", "!iqn.bad"], vec![Netmask::Any]);
        assert!(!group_allows(&g, "IQN.BAD", lo));
        assert!(group_allows(&g, "iqn.good", lo));
        let g = group(
            &["iqn.only"],
            vec![Netmask::Cidr {
                addr: "10.0.0.0".parse().unwrap(),
                prefix: 8,
            }],
        );
        assert!(!group_allows(&g, "iqn.only", lo));
        assert!(group_allows(&g, "iqn.only", "10.1.2.3".parse().unwrap()));
        assert!(group_allows(
            &g,
            "iqn.only",
            "::ffff:10.1.2.3".parse().unwrap()
        ));
        assert!(!group_allows(&g, "iqn.other", "10.1.2.3".parse().unwrap()));
        let g6 = group(
            &["ANY"],
            vec![Netmask::Cidr {
                addr: "fd00::".parse().unwrap(),
                prefix: 16,
            }],
        );
        assert!(group_allows(&g6, "x", "fd00::5".parse().unwrap()));
        assert!(!group_allows(&g6, "x", "fe80::5".parse().unwrap()));
    }

    fn model() -> Model {
        let cfg = crate::tgt::config::parse(
            r#"
[[portal_group]]
tag = 1
portals = ["127.0.0.1:3260"]
[[portal_group]]
tag = 2
portals = ["127.0.0.1:3261"]
[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["127.0.0.0/8"]
[[initiator_group]]
tag = 2
initiators = ["iqn.only"]
netmasks = ["ANY"]
[[bdev]]
name = "A"
type = "null"
size = "1MiB"
[[bdev]]
name = "B"
type = "null"
size = "1MiB"
[[target]]
name = "iqn.2026-11.io.x:a"
luns = [ { lun = 0, bdev = "A" } ]
mappings = [ { portal_group = 1, initiator_group = 1 } ]
[[target]]
name = "iqn.2026-11.io.x:b"
luns = [ { lun = 0, bdev = "B" } ]
mappings = [ { portal_group = 2, initiator_group = 2 } ]
"#,
            "test.toml",
        )
        .unwrap();
        build_devices(&cfg).unwrap();
        Model::new(cfg)
    }

    #[test]
    fn login_lookup_applies_portal_groups_and_acls() {
        let t = model();
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        assert_eq!(
            t.login_target("iqn.2026-11.io.x:a", "iqn.i", peer, 1)
                .unwrap()
                .id,
            0
        );
        assert_eq!(
            t.login_target("IQN.2026-11.IO.X:A", "iqn.i", peer, 1)
                .unwrap()
                .id,
            0,
            "names compare case-insensitively"
        );
        // Exposed on portal group 2 only.
        assert_eq!(
            t.login_target("iqn.2026-11.io.x:b", "iqn.only", peer, 1),
            Err(LoginStatus::NOT_FOUND)
        );
        assert_eq!(
            t.login_target("iqn.2026-11.io.x:b", "iqn.other", peer, 2),
            Err(LoginStatus::AUTHORIZATION_FAILED)
        );
        assert!(t
            .login_target("iqn.2026-11.io.x:b", "iqn.only", peer, 2)
            .is_ok());
        assert_eq!(
            t.login_target("iqn.nope", "iqn.i", peer, 1),
            Err(LoginStatus::NOT_FOUND)
        );
        // From outside 127/8 the first group refuses.
        let far: SocketAddr = "[::1]:5000".parse().unwrap();
        assert_eq!(
            t.login_target("iqn.2026-11.io.x:a", "iqn.i", far, 1),
            Err(LoginStatus::AUTHORIZATION_FAILED)
        );
    }

    #[test]
    fn discovery_lists_only_visible_targets_with_their_portals() {
        let t = model();
        let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:3260".parse().unwrap();
        let seen = t.discover("iqn.i", peer, local, None);
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].name, "iqn.2026-11.io.x:a");
        assert_eq!(seen[0].addresses, vec!["127.0.0.1:3260,1".to_string()]);
        let seen = t.discover("iqn.only", peer, local, None);
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[1].addresses, vec!["127.0.0.1:3261,2".to_string()]);
        let one = t.discover("iqn.only", peer, local, Some("iqn.2026-11.io.x:b"));
        assert_eq!(one.len(), 1);
    }

    fn lim(total: u32, per_target: u32, per_initiator: u32) -> SessionLimits {
        SessionLimits {
            total,
            per_target,
            per_initiator,
        }
    }

    fn ns(uid: u64, p: &SessionParams) -> NewSession<'_> {
        NewSession {
            conn_uid: uid,
            cid: 0,
            reactor: 0,
            params: p,
            nexus: uid,
        }
    }

    #[test]
    fn connections_join_a_session_up_to_max_connections() {
        let mut t = Registry::new();
        let p = SessionParams {
            max_connections: 2,
            ..SessionParams::default()
        };
        let key = SessionKey {
            initiator: "iqn.i".into(),
            isid: [0x80, 0, 0, 0, 0, 1],
            target: Some(0),
            pg: 1,
        };
        let new = NewSession {
            reactor: 1,
            ..ns(10, &p)
        };
        let a = t.register(key.clone(), new, lim(16, 0, 0)).unwrap();
        // Someone else's key (another ISID) cannot join; an unknown TSIH neither.
        let other = SessionKey {
            isid: [0x80, 0, 0, 0, 0, 2],
            ..key.clone()
        };
        assert_eq!(
            t.join(a.tsih, &other, 1, 11),
            Err(LoginStatus::SESSION_DOES_NOT_EXIST)
        );
        assert_eq!(
            t.may_join(a.tsih.wrapping_add(1), &key, 1).err(),
            Some(LoginStatus::SESSION_DOES_NOT_EXIST)
        );
        let j = t.join(a.tsih, &key, 1, 11).unwrap();
        assert_eq!((j.reactor, j.nexus, j.replaced), (1, 10, None));
        assert_eq!(j.params.max_connections, 2);
        // MaxConnections 2: a third CID is refused, the same CID again replaces it.
        assert_eq!(
            t.join(a.tsih, &key, 2, 12),
            Err(LoginStatus::TOO_MANY_CONNECTIONS)
        );
        assert_eq!(t.join(a.tsih, &key, 1, 13).unwrap().replaced, Some(11));
        // The session lives on while a connection is left.
        assert!(t.unregister(a.tsih, 10));
        assert!(t.unregister(a.tsih, 11), "replaced: not a member any more");
        assert!(t.exists(a.tsih));
        assert!(!t.unregister(a.tsih, 13), "the last one ends it");
        assert!(!t.exists(a.tsih));
        // Reinstating a session closes all its connections.
        let b = t.register(key.clone(), ns(20, &p), lim(16, 0, 0)).unwrap();
        t.join(b.tsih, &key, 1, 21).unwrap();
        let c = t.register(key.clone(), ns(30, &p), lim(16, 0, 0)).unwrap();
        assert_eq!(c.reinstated, vec![20, 21]);
        assert_eq!(c.ended, Some((b.tsih, Some(0), 20)));
        // Another portal group is another session (SSID = ISID + TPGT).
        let via_pg2 = SessionKey {
            pg: 2,
            ..key.clone()
        };
        assert_eq!(
            t.join(c.tsih, &via_pg2, 1, 31),
            Err(LoginStatus::SESSION_DOES_NOT_EXIST)
        );
        let d = t.register(via_pg2, ns(40, &p), lim(16, 0, 0)).unwrap();
        assert!(d.reinstated.is_empty() && t.exists(c.tsih));
    }

    #[test]
    fn same_isid_reinstates_the_old_session() {
        let mut t = Registry::new();
        let p = SessionParams::default();
        let key = SessionKey {
            initiator: "iqn.i".into(),
            isid: [0x80, 0, 0, 0, 0, 1],
            target: Some(0),
            pg: 1,
        };
        let a = t.register(key.clone(), ns(10, &p), lim(16, 0, 0)).unwrap();
        assert!(a.reinstated.is_empty());
        let other = SessionKey {
            isid: [0x80, 0, 0, 0, 0, 2],
            ..key.clone()
        };
        let b = t
            .register(other.clone(), ns(11, &p), lim(16, 0, 0))
            .unwrap();
        assert_ne!(a.tsih, b.tsih);
        // Two sessions on the target: a third is refused with a cap of 2.
        let third = SessionKey {
            isid: [0x80, 0, 0, 0, 0, 3],
            ..other
        };
        assert_eq!(
            t.register(third.clone(), ns(13, &p), lim(16, 2, 0)),
            Err(LoginStatus::OUT_OF_RESOURCES)
        );
        // The same initiator on another target, with a cap of 2 per initiator name.
        let elsewhere = SessionKey {
            target: Some(1),
            ..third
        };
        assert_eq!(
            t.register(elsewhere.clone(), ns(14, &p), lim(16, 0, 2)),
            Err(LoginStatus::OUT_OF_RESOURCES)
        );
        assert!(t.register(elsewhere, ns(14, &p), lim(16, 0, 3)).is_ok());
        let c = t.register(key, ns(12, &p), lim(16, 2, 0)).unwrap();
        assert_eq!(c.reinstated, vec![10]);
        assert!(!t.exists(a.tsih));
        assert!(t.exists(c.tsih));
        // The old connection's late teardown must not remove the new session.
        t.unregister(c.tsih, 10);
        assert!(t.exists(c.tsih));
        assert_eq!(t.len(), 3);
    }

    #[test]
    fn lun_identity_is_stable() {
        let node = TargetNode {
            name: "iqn.2026-11.io.x:t".into(),
            alias: None,
            luns: vec![],
            mappings: vec![],
            queue_depth: 8,
            auth: Default::default(),
        };
        let a = lun_identity(&node, 0, "Malloc0", "/s");
        let b = lun_identity(&node, 0, "Malloc0", "/s");
        let c = lun_identity(&node, 1, "Malloc1", "/s");
        assert_eq!(a, b);
        assert_ne!(a.naa, c.naa);
        assert_eq!(a.naa >> 60, 5);
        assert_eq!(a.serial.len(), 16);
    }

    #[test]
    fn plan_of_the_same_configuration_is_empty() {
        let m = model();
        let p = plan(&m, &m.current_config()).unwrap();
        assert!(p.is_empty(), "{:?}", p.changes);
        assert!(p.luns.is_empty() && p.open.is_empty() && p.portals_add.is_empty());
    }

    #[test]
    fn plan_adds_and_removes_luns_targets_and_bdevs() {
        let m = model();
        // Target a gets LUN 1 on a new bdev C.
        let mut d = m.current_config();
        d.targets[0].luns.push(crate::tgt::LunMapping {
            lun: 1,
            bdev: "C".into(),
        });
        d.bdevs.push(BdevConfig {
            name: "C".into(),
            block_size: 512,
            kind: BdevKind::Malloc { size: 2 << 20 },
        });
        let p = plan(&m, &d).unwrap();
        assert_eq!(
            p.changes,
            vec![
                "bdev C added".to_string(),
                "target iqn.2026-11.io.x:a: LUN 1 added (bdev C)".to_string()
            ]
        );
        assert_eq!(p.open.len(), 1);
        assert_eq!(p.luns.len(), 1);
        assert_eq!(
            (p.luns[0].target, p.luns[0].lun, p.luns[0].replace),
            (0, 1, false)
        );
        assert_eq!(p.model.version, m.version + 1);
        assert!(p.model.lun_exists(0, 1));

        // Removing target b keeps its id as a tombstone; its bdev B can go too.
        let mut d = m.current_config();
        d.targets.retain(|t| t.name != "iqn.2026-11.io.x:b");
        d.bdevs.retain(|b| b.name != "B");
        let p = plan(&m, &d).unwrap();
        assert_eq!(
            p.changes,
            vec![
                "bdev B removed".to_string(),
                "target iqn.2026-11.io.x:b removed".to_string()
            ]
        );
        assert!(!p.model.is_live(1));
        assert_eq!(p.model.target_count(), 2);
        // A new target after that gets a fresh id.
        let mut d2 = p.model.current_config();
        let mut t = d2.targets[0].clone();
        t.name = "iqn.2026-11.io.x:c".into();
        t.luns[0].bdev = "D".into();
        d2.targets.push(t);
        d2.bdevs.push(BdevConfig {
            name: "D".into(),
            block_size: 512,
            kind: BdevKind::Null { size: 1 << 20 },
        });
        let p2 = plan(&p.model, &d2).unwrap();
        assert_eq!(p2.luns[0].target, 2);
        assert!(p2.model.is_live(2) && !p2.model.is_live(1));
    }

    #[test]
    fn plan_refuses_moving_a_busy_bdev_and_userspace_changes() {
        let m = model();
        // Bdev B moves from target b to target a in one step.
        let mut d = m.current_config();
        d.targets[1].luns.clear();
        d.targets.remove(1);
        d.targets[0].luns.push(crate::tgt::LunMapping {
            lun: 1,
            bdev: "B".into(),
        });
        let e = plan(&m, &d).unwrap_err();
        assert!(
            e.contains("bdev B backs LUN 0 of iqn.2026-11.io.x:b"),
            "{e}"
        );
        let mut d = m.current_config();
        d.portal_groups[1].transport = crate::tgt::Transport::Tap;
        let e = plan(&m, &d).unwrap_err();
        assert!(e.contains("portal group 2: userspace"), "{e}");
    }

    #[test]
    fn plan_resizes_reopens_and_moves_portals() {
        let m = model();
        let mut d = m.current_config();
        d.bdevs[0].kind = BdevKind::Null { size: 4 << 20 };
        d.bdevs[1].kind = BdevKind::Malloc { size: 1 << 20 };
        d.portal_groups[0].portals = vec!["127.0.0.1:3270".parse().unwrap()];
        d.portal_groups[1].tag = 3;
        d.targets[1].mappings[0].portal_group = 3;
        d.global.cpumask = 0x3;
        d.global.max_sessions = 7;
        let p = plan(&m, &d).unwrap();
        assert_eq!(p.resize, vec![("A".to_string(), 8192)]);
        assert_eq!(
            p.open.iter().map(|b| b.name.as_str()).collect::<Vec<_>>(),
            ["B"]
        );
        assert_eq!(p.luns.len(), 1);
        assert!(
            p.luns[0].replace,
            "B's LUN is swapped for the reopened bdev"
        );
        assert_eq!(p.portals_add, vec![("127.0.0.1:3270".parse().unwrap(), 1)]);
        assert_eq!(p.portals_del, vec!["127.0.0.1:3260".parse().unwrap()]);
        assert_eq!(
            p.portals_retag,
            vec![("127.0.0.1:3261".parse().unwrap(), 3)]
        );
        assert_eq!(
            p.restart,
            vec!["global.cpumask: 1 -> 3 (restart to apply)".to_string()]
        );
        assert_eq!(p.model.global().cpumask, 0x1, "the running value stays");
        let mut d2 = m.current_config();
        d2.bdevs[1].block_size = 4096;
        let e = plan(&m, &d2).unwrap_err();
        assert!(e.contains("block size of a LUN in use"), "{e}");
        assert_eq!(p.model.global().max_sessions, 7);
        assert!(p
            .changes
            .contains(&"global.max_sessions: 1024 -> 7".to_string()));
        assert!(p.changes.contains(&"portal group 2 removed".to_string()));
        assert!(p
            .changes
            .contains(&"portal group 3 added (127.0.0.1:3261)".to_string()));
    }
}
