//! The live object model: what every reactor shares about targets, portal groups and
//! initiator groups ([`Model`], immutable once built), the session registry ([`Registry`]),
//! and the SCSI devices built from the configuration ([`build_devices`]), each of which is
//! then owned by one reactor.

use super::{BdevConfig, BdevKind, Config, FileEngine, InitiatorGroup, Netmask, TargetNode};
use crate::bdev::uring::{UringBdev, UringOptions};
use crate::bdev::{file::FileBdev, malloc::MallocBdev, null::NullBdev, BlockDevice};
use crate::iscsi::{DiscoveryEntry, LoginStatus, Registered, SessionKey, TargetId, TargetInfo};
use crate::scsi::{Device, LunIdentity};
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
pub fn lun_identity(target: &TargetNode, lun: u64, bdev: &str, pg_tag: u16) -> LunIdentity {
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
        portal_group_tag: pg_tag,
        relative_port: 1,
    }
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

/// Builds one SCSI device per target node (index = [`TargetId`]), opening every bdev.
pub fn build_devices(config: &Config) -> Result<Vec<Device>, BuildError> {
    let mut bdevs: HashMap<String, Box<dyn BlockDevice>> = HashMap::new();
    for b in &config.bdevs {
        bdevs.insert(b.name.clone(), open_bdev(b)?);
    }
    config
        .targets
        .iter()
        .map(|node| build_device(node, &mut bdevs))
        .collect()
}

/// Builds the SCSI device of one target from opened bdevs (taking the ones it uses).
pub fn build_device(
    node: &TargetNode,
    bdevs: &mut HashMap<String, Box<dyn BlockDevice>>,
) -> Result<Device, BuildError> {
    {
        let mut device = Device::new();
        let pg_tag = node.mappings.first().map_or(1, |m| m.portal_group);
        for l in &node.luns {
            let bdev = bdevs.remove(&l.bdev).ok_or_else(|| BuildError::Lun {
                target: node.name.clone(),
                lun: l.lun,
                error: format!("bdev {} is missing or already used", l.bdev),
            })?;
            let ident = lun_identity(node, l.lun, &l.bdev, pg_tag);
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

    pub fn lun_exists(&self, target: TargetId, lun: u64) -> bool {
        self.is_live(target)
            && self
                .config
                .targets
                .get(target)
                .is_some_and(|t| t.luns.iter().any(|l| l.lun == lun))
    }
}

struct SessionEntry {
    key: SessionKey,
    conn_uid: u64,
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
        conn_uid: u64,
        max_sessions: u32,
    ) -> Result<Registered, LoginStatus> {
        let mut reinstated = None;
        if let Some((&old_tsih, old)) = self.sessions.iter().find(|(_, s)| s.key == key) {
            reinstated = Some(old.conn_uid);
            self.sessions.remove(&old_tsih);
        }
        if reinstated.is_none() && self.sessions.len() >= max_sessions as usize {
            return Err(LoginStatus::OUT_OF_RESOURCES);
        }
        let mut tsih = self.next_tsih;
        while tsih == 0 || self.sessions.contains_key(&tsih) {
            tsih = tsih.wrapping_add(1);
        }
        self.next_tsih = tsih.wrapping_add(1);
        self.sessions.insert(tsih, SessionEntry { key, conn_uid });
        Ok(Registered { tsih, reinstated })
    }

    /// Every session: TSIH, key, connection.
    pub fn list(&self) -> Vec<(u16, SessionKey, u64)> {
        let mut v: Vec<_> = self
            .sessions
            .iter()
            .map(|(t, s)| (*t, s.key.clone(), s.conn_uid))
            .collect();
        v.sort_by_key(|(t, _, _)| *t);
        v
    }

    pub fn exists(&self, tsih: u16) -> bool {
        self.sessions.contains_key(&tsih)
    }

    /// Removes a session, unless a newer connection has reinstated it meanwhile.
    pub fn unregister(&mut self, tsih: u16, conn_uid: u64) {
        if self
            .sessions
            .get(&tsih)
            .is_some_and(|s| s.conn_uid == conn_uid)
        {
            self.sessions.remove(&tsih);
        }
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

    #[test]
    fn same_isid_reinstates_the_old_session() {
        let mut t = Registry::new();
        let key = SessionKey {
            initiator: "iqn.i".into(),
            isid: [0x80, 0, 0, 0, 0, 1],
            target: Some(0),
        };
        let a = t.register(key.clone(), 10, 16).unwrap();
        assert_eq!(a.reinstated, None);
        let other = SessionKey {
            isid: [0x80, 0, 0, 0, 0, 2],
            ..key.clone()
        };
        let b = t.register(other, 11, 16).unwrap();
        assert_ne!(a.tsih, b.tsih);
        let c = t.register(key, 12, 16).unwrap();
        assert_eq!(c.reinstated, Some(10));
        assert!(!t.exists(a.tsih));
        assert!(t.exists(c.tsih));
        // The old connection's late teardown must not remove the new session.
        t.unregister(c.tsih, 10);
        assert!(t.exists(c.tsih));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn lun_identity_is_stable() {
        let node = TargetNode {
            name: "iqn.2026-11.io.x:t".into(),
            alias: None,
            luns: vec![],
            mappings: vec![],
            queue_depth: 8,
        };
        let a = lun_identity(&node, 0, "Malloc0", 1);
        let b = lun_identity(&node, 0, "Malloc0", 1);
        let c = lun_identity(&node, 1, "Malloc1", 1);
        assert_eq!(a, b);
        assert_ne!(a.naa, c.naa);
        assert_eq!(a.naa >> 60, 5);
        assert_eq!(a.serial.len(), 16);
    }
}
