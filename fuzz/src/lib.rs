//! What the fuzz targets share: a target environment backed by the real object model (the
//! a plain target and a CHAP one) and a real SCSI device on a null disk, so that bytes fed
//! to a connection travel the whole protocol path.

use dataplane::bdev::null::NullBdev;
use dataplane::iscsi::chap::AuthPolicy;
use dataplane::iscsi::conn::{Connection, Keepalive};
use dataplane::iscsi::params::SessionParams;
use dataplane::iscsi::{
    DiscoveryEntry, Joined, LoginStatus, Registered, SessionKey, TargetEnv, TargetId, TargetInfo,
};
use dataplane::scsi::{Device, ItNexus, NexusId, ScsiResponse, ScsiTask};
use dataplane::tgt::live::{lun_identity, Model, Registry};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The configuration the fuzzed connections log in to: a plain target and a CHAP one.
pub const CONFIG: &str = r#"
[[portal_group]]
tag = 1
portals = ["127.0.0.1:3260"]

[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]

[[auth_group]]
tag = 1
secrets = [ { user = "alice", secret = "alice-secret-12", mutual_user = "t", mutual_secret = "target-secret-9" } ]

[[bdev]]
name = "M0"
type = "null"
size = "1MiB"

[[bdev]]
name = "M1"
type = "null"
size = "1MiB"

[[target]]
name = "iqn.2026-11.io.fuzz:a"
luns = [ { lun = 0, bdev = "M0" } ]
mappings = [ { portal_group = 1, initiator_group = 1 } ]

[[target]]
name = "iqn.2026-11.io.fuzz:chap"
auth_group = 1
require_chap = true
luns = [ { lun = 0, bdev = "M1" } ]
mappings = [ { portal_group = 1, initiator_group = 1 } ]
"#;

pub struct FuzzEnv {
    pub model: Model,
    pub registry: Registry,
    pub device: Device,
    pub out: Vec<ScsiResponse>,
}

impl FuzzEnv {
    pub fn new() -> Self {
        // Parsed once; each run gets its own copy.
        static MODEL: std::sync::OnceLock<Model> = std::sync::OnceLock::new();
        let model = MODEL
            .get_or_init(|| {
                Model::new(dataplane::tgt::config::parse(CONFIG, "fuzz").expect("fuzz config"))
            })
            .clone();
        let mut device = Device::new();
        let node = &model.config().targets[0];
        // (The scsi_device target covers the RAM disk; here the protocol path matters.)
        let bdev = NullBdev::new("M0", 512, 1 << 20).expect("null");
        device
            .add_lun(0, Box::new(bdev), {
                // No APTPL state file: a fuzzer must not write to the disk.
                let mut id = lun_identity(node, 0, "M0", "/");
                id.pr_file = None;
                id
            })
            .expect("lun");
        FuzzEnv {
            model,
            registry: Registry::new(),
            device,
            out: Vec::new(),
        }
    }
}

impl Default for FuzzEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl TargetEnv for FuzzEnv {
    fn global(&self) -> &dataplane::tgt::Global {
        self.model.global()
    }
    fn login_target(
        &self,
        name: &str,
        initiator: &str,
        peer: SocketAddr,
        pg_tag: u16,
    ) -> Result<TargetInfo, LoginStatus> {
        self.model.login_target(name, initiator, peer, pg_tag)
    }
    fn discover(
        &self,
        initiator: &str,
        peer: SocketAddr,
        local: SocketAddr,
        only: Option<&str>,
    ) -> Vec<DiscoveryEntry> {
        self.model.discover(initiator, peer, local, only)
    }
    fn register_session(
        &mut self,
        key: SessionKey,
        uid: u64,
        cid: u16,
        params: &SessionParams,
        nexus: NexusId,
    ) -> Result<Registered, LoginStatus> {
        let new = dataplane::tgt::live::NewSession {
            conn_uid: uid,
            cid,
            reactor: 0,
            params,
            nexus,
        };
        let limits = dataplane::tgt::live::SessionLimits {
            total: 16,
            per_target: 16,
            per_initiator: 16,
        };
        self.registry.register(key, new, limits)
    }
    fn session_to_join(
        &self,
        tsih: u16,
        key: &SessionKey,
        cid: u16,
    ) -> Result<SessionParams, LoginStatus> {
        self.registry.may_join(tsih, key, cid).cloned()
    }
    fn join_session(
        &mut self,
        tsih: u16,
        key: &SessionKey,
        cid: u16,
        uid: u64,
    ) -> Result<Joined, LoginStatus> {
        self.registry.join(tsih, key, cid, uid)
    }
    fn unregister_session(&mut self, tsih: u16, uid: u64) -> bool {
        self.registry.unregister(tsih, uid)
    }
    fn lun_exists(&self, target: TargetId, lun: u64) -> bool {
        self.model.lun_exists(target, lun)
    }
    fn auth_policy(&self, target: Option<TargetId>) -> AuthPolicy {
        self.model.auth_policy(target)
    }
    fn scsi_submit(&mut self, _target: TargetId, task: ScsiTask) {
        self.device.submit(task);
    }
    fn nexus_added(&mut self, _t: TargetId, n: NexusId, it: ItNexus) {
        self.device.nexus_added(n, it)
    }
    fn nexus_removed(&mut self, _t: TargetId, n: NexusId) {
        self.device.nexus_removed(n)
    }
    fn lun_reset(&mut self, _t: TargetId, lun: u64, by: NexusId, ack: u64) {
        self.device.lun_reset(lun, by);
        self.device.acknowledge(ack);
    }
    fn target_reset(&mut self, _t: TargetId, by: NexusId, cold: bool, ack: u64) {
        self.device.target_reset(by, cold);
        self.device.acknowledge(ack);
    }
}

/// Feeds `data` to a fresh connection in chunks whose sizes come from the data itself,
/// completing SCSI commands and draining what the connection sends, as a reactor would.
pub fn run_connection(data: &[u8]) {
    let mut env = FuzzEnv::new();
    let now = Instant::now();
    let ka = Keepalive {
        interval: Some(Duration::from_secs(5)),
        timeout: Duration::from_secs(5),
        login: Duration::from_secs(15),
        pdu: Duration::from_secs(30),
        buffer_cap: 64 << 20,
    };
    let peer: SocketAddr = "127.0.0.1:5000".parse().unwrap();
    let local: SocketAddr = "127.0.0.1:3260".parse().unwrap();
    let mut conn = Connection::new(1, peer, local, 1, ka, now);
    let (sizes, mut rest) = data.split_at(data.len().min(8));
    let mut step = 0;
    while !rest.is_empty() && conn.wants_close().is_none() {
        let want = 1 + usize::from(*sizes.get(step % sizes.len().max(1)).unwrap_or(&255)) * 37;
        step += 1;
        let buf = conn.rx_buf();
        if buf.is_empty() {
            break;
        }
        let n = buf.len().min(want).min(rest.len());
        buf[..n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        conn.rx_filled(n, &mut env, now);
        let mut out = Vec::new();
        env.device.poll(&mut out);
        for r in out {
            conn.scsi_done(r);
        }
        // Drain the transmit queue like a socket that takes everything.
        loop {
            let mut iov = Vec::new();
            conn.tx_iovecs(&mut iov, 64);
            let n: usize = iov.iter().map(|s| s.len()).sum();
            if n == 0 {
                break;
            }
            conn.tx_consumed(n);
        }
        conn.on_tick(now + Duration::from_millis(step as u64 * 100));
    }
    conn.teardown(&mut env);
}
