//! The sans-IO iSCSI protocol core (RFC 7143).
//!
//! A [`conn::Connection`] takes the bytes of one TCP connection (the transport asks it where
//! the next bytes should land, so data segments go straight into their final buffer) and
//! produces PDUs to send. Everything outside one connection, such as target lookup, access
//! control, the session registry and the SCSI devices, is reached through the
//! [`TargetEnv`] trait, so the core runs unchanged over any transport and in unit tests.

pub mod chap;
pub mod conn;
pub mod login;
pub mod params;
pub mod pdu;
pub mod text;

use crate::scsi::{ItNexus, NexusId, ScsiTask};
use std::net::SocketAddr;

/// Index of a target node in the environment.
pub type TargetId = usize;

/// Login status class and detail (RFC 7143 §11.13.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginStatus(pub u8, pub u8);

impl LoginStatus {
    pub const SUCCESS: LoginStatus = LoginStatus(0x00, 0x00);
    pub const INITIATOR_ERROR: LoginStatus = LoginStatus(0x02, 0x00);
    pub const AUTHENTICATION_FAILED: LoginStatus = LoginStatus(0x02, 0x01);
    pub const AUTHORIZATION_FAILED: LoginStatus = LoginStatus(0x02, 0x02);
    pub const NOT_FOUND: LoginStatus = LoginStatus(0x02, 0x03);
    pub const TARGET_REMOVED: LoginStatus = LoginStatus(0x02, 0x04);
    pub const UNSUPPORTED_VERSION: LoginStatus = LoginStatus(0x02, 0x05);
    pub const TOO_MANY_CONNECTIONS: LoginStatus = LoginStatus(0x02, 0x06);
    pub const MISSING_PARAMETER: LoginStatus = LoginStatus(0x02, 0x07);
    pub const CANT_INCLUDE_IN_SESSION: LoginStatus = LoginStatus(0x02, 0x08);
    pub const SESSION_TYPE_NOT_SUPPORTED: LoginStatus = LoginStatus(0x02, 0x09);
    pub const SESSION_DOES_NOT_EXIST: LoginStatus = LoginStatus(0x02, 0x0a);
    pub const INVALID_DURING_LOGIN: LoginStatus = LoginStatus(0x02, 0x0b);
    pub const TARGET_ERROR: LoginStatus = LoginStatus(0x03, 0x00);
    pub const SERVICE_UNAVAILABLE: LoginStatus = LoginStatus(0x03, 0x01);
    pub const OUT_OF_RESOURCES: LoginStatus = LoginStatus(0x03, 0x02);
}

/// Identifies a session for reinstatement: initiator name, ISID and target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub initiator: String,
    pub isid: [u8; 6],
    pub target: Option<TargetId>,
    /// The target portal group: a session (SSID = ISID + TPGT) lives in one (RFC 7143 §4.4).
    pub pg: u16,
}

/// What the login needs to know about a target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetInfo {
    pub id: TargetId,
    pub name: String,
    pub alias: Option<String>,
    pub queue_depth: u32,
}

/// One SendTargets entry: a target name and its addresses ("ip:port,tpgt").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryEntry {
    pub name: String,
    pub addresses: Vec<String>,
}

/// Outcome of registering a new session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub tsih: u16,
    /// An existing session with the same key that this login reinstates: its connections
    /// (by uid) must be closed.
    pub reinstated: Vec<u64>,
    /// The session reinstatement ended (TSIH, target, I_T nexus): its nexus goes.
    pub ended: Option<(u16, Option<TargetId>, NexusId)>,
}

/// What a connection joining an existing session (MC/S) takes from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Joined {
    /// The reactor the session's connections live on (the joiner moves there).
    pub reactor: usize,
    /// The session's negotiated parameters.
    pub params: params::SessionParams,
    /// The session's I_T nexus, shared by all its connections.
    pub nexus: NexusId,
    /// A connection of the session with the same CID, which this one replaces
    /// (connection reinstatement): it must be closed.
    pub replaced: Option<u64>,
}

/// Everything a connection needs from outside itself.
pub trait TargetEnv {
    /// Operational defaults and limits.
    fn global(&self) -> &crate::tgt::Global;
    /// Finds the target an initiator asks for through portal group `pg_tag`, checking that
    /// it is exposed there and that the initiator may log in to it.
    fn login_target(
        &self,
        name: &str,
        initiator: &str,
        peer: SocketAddr,
        pg_tag: u16,
    ) -> Result<TargetInfo, LoginStatus>;
    /// SendTargets: the targets the initiator may see (`only`: a single target name).
    fn discover(
        &self,
        initiator: &str,
        peer: SocketAddr,
        local: SocketAddr,
        only: Option<&str>,
    ) -> Vec<DiscoveryEntry>;
    /// Registers a session (TSIH 0 login) from connection `conn_uid` (CID `cid`, I_T nexus
    /// `nexus`), negotiated with `params`.
    fn register_session(
        &mut self,
        key: SessionKey,
        conn_uid: u64,
        cid: u16,
        params: &params::SessionParams,
        nexus: NexusId,
    ) -> Result<Registered, LoginStatus>;
    /// The parameters of session `tsih` that a login with `key` may add a connection to:
    /// SESSION_DOES_NOT_EXIST when there is no such session (or it is someone else's),
    /// TOO_MANY_CONNECTIONS when it has MaxConnections already.
    fn session_to_join(
        &self,
        tsih: u16,
        key: &SessionKey,
        cid: u16,
    ) -> Result<params::SessionParams, LoginStatus>;
    /// Adds connection `conn_uid` (CID `cid`) to session `tsih` at the end of its login.
    fn join_session(
        &mut self,
        tsih: u16,
        key: &SessionKey,
        cid: u16,
        conn_uid: u64,
    ) -> Result<Joined, LoginStatus>;
    /// Connection `conn_uid` of session `tsih` has ended; true when the session lives on
    /// with other connections (MC/S), or the connection was no longer part of it (replaced,
    /// or its session reinstated); false when the session ended with it.
    fn unregister_session(&mut self, tsih: u16, conn_uid: u64) -> bool;
    /// Connection `conn_uid` of session `tsih` failed at ERL 2: the session lives on
    /// without it, and `tasks` wait `retain` for TASK REASSIGN (then the session ends if
    /// no connection came back). Default: they are dropped.
    fn keep_orphans(
        &mut self,
        tsih: u16,
        conn_uid: u64,
        tasks: Vec<conn::OrphanTask>,
        retain: std::time::Duration,
    ) {
        let _ = (tasks, retain);
        self.unregister_session(tsih, conn_uid);
    }
    /// Takes task `itt` of session `tsih` left by a failed connection, for connection
    /// `new_uid` (its answer from the device, if still to come, goes there).
    fn reclaim_orphan(&mut self, tsih: u16, itt: u32, new_uid: u64) -> Option<conn::OrphanTask> {
        let _ = (tsih, itt, new_uid);
        None
    }
    /// Whether session `tsih` has a connection with this CID.
    fn session_has_cid(&self, tsih: u16, cid: u16) -> bool {
        let _ = (tsih, cid);
        false
    }
    /// Whether the target has this LUN.
    fn lun_exists(&self, target: TargetId, lun: u64) -> bool;

    /// How logins to `target` (None: discovery) authenticate. Default: no CHAP.
    fn auth_policy(&self, target: Option<TargetId>) -> chap::AuthPolicy {
        let _ = target;
        chap::AuthPolicy::default()
    }
    /// Hands a SCSI command to the target's device.
    fn scsi_submit(&mut self, target: TargetId, task: ScsiTask);
    /// A session of I_T nexus `it` (its initiator and target ports) begins.
    fn nexus_added(&mut self, target: TargetId, nexus: NexusId, it: ItNexus);
    fn nexus_removed(&mut self, target: TargetId, nexus: NexusId);
    /// LOGICAL UNIT RESET by session `by`; when the device has done it, it answers with a
    /// response tagged `ack` (delivered like a command's, to the connection's `scsi_done`).
    fn lun_reset(&mut self, target: TargetId, lun: u64, by: NexusId, ack: u64);
    /// TARGET WARM/COLD RESET, acknowledged like [`TargetEnv::lun_reset`].
    fn target_reset(&mut self, target: TargetId, by: NexusId, cold: bool, ack: u64);
}
