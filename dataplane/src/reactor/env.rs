//! The [`TargetEnv`] a reactor gives its connections: the shared model for logins and
//! discovery, the devices homed on this reactor, and an outbox for the others.

use super::shared::{Msg, ParkMsg, Shared};
use crate::iscsi::{
    DiscoveryEntry, LoginStatus, Registered, SessionKey, TargetEnv, TargetId, TargetInfo,
};
use crate::mem::IoBuf;
use crate::scsi::{Device, NexusId, ScsiResponse, ScsiTask};
use crossbeam_channel::TrySendError;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

pub struct ReactorEnv {
    pub me: usize,
    pub shared: Arc<Shared>,
    /// The current model (targets, access rules): the start one, then whatever the control
    /// plane sent.
    pub model: Arc<crate::tgt::live::Model>,
    /// Devices of removed targets, dropped once their commands in flight are done.
    removing: Vec<TargetId>,
    /// Devices whose home is this reactor.
    pub devices: HashMap<TargetId, Device>,
    /// Messages waiting for room in another reactor's inbox, per destination.
    outbox: Vec<VecDeque<Msg>>,
    /// Commands forwarded here by other reactors: tag → reactor to answer.
    pub remote_origin: HashMap<u64, usize>,
    /// Connections of this reactor to close (their sessions were reinstated).
    pub close_local: Vec<u64>,
    /// Responses to this reactor's own commands, ready to route to connections.
    pub responses: Vec<ScsiResponse>,
    scratch: Vec<ScsiResponse>,
}

impl ReactorEnv {
    pub fn new(me: usize, shared: Arc<Shared>, devices: HashMap<TargetId, Device>) -> Self {
        let n = shared.mailboxes.len();
        ReactorEnv {
            me,
            model: shared.model.clone(),
            removing: Vec::new(),
            shared,
            devices,
            outbox: (0..n).map(|_| VecDeque::new()).collect(),
            remote_origin: HashMap::new(),
            close_local: Vec::new(),
            responses: Vec::new(),
            scratch: Vec::new(),
        }
    }

    /// Queues a message for reactor `to` (delivered by [`flush_outbox`](Self::flush_outbox)).
    pub fn send(&mut self, to: usize, msg: Msg) {
        self.outbox[to].push_back(msg);
    }

    /// Moves queued messages into the other reactors' inboxes, as far as they have room, and
    /// wakes the ones that got mail. Returns true when messages remain queued.
    pub fn flush_outbox(&mut self) -> bool {
        let mut left = false;
        for to in 0..self.outbox.len() {
            let mut sent = false;
            while let Some(msg) = self.outbox[to].pop_front() {
                match self.shared.mailboxes[to].tx.try_send(msg) {
                    Ok(()) => sent = true,
                    Err(TrySendError::Full(msg)) => {
                        self.outbox[to].push_front(msg);
                        left = true;
                        break;
                    }
                    Err(TrySendError::Disconnected(_)) => {
                        self.outbox[to].clear();
                        break;
                    }
                }
            }
            if sent {
                self.shared.wake(to);
            }
        }
        left
    }

    /// Commands in flight in this reactor's devices.
    pub fn local_in_flight(&self) -> usize {
        self.devices.values().map(Device::in_flight).sum()
    }

    /// Whether the local devices let the reactor sleep (see [`Device::can_sleep`]).
    pub fn devices_can_sleep(&self) -> bool {
        self.devices.values().all(Device::can_sleep)
    }

    /// The completion fds of the local devices, for the reactor's epoll.
    pub fn completion_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.devices
            .values()
            .flat_map(Device::completion_fds)
            .collect()
    }

    /// Clears the local devices' completion fds after one fired.
    pub fn ack_completions(&mut self) {
        for d in self.devices.values_mut() {
            d.ack_completions();
        }
    }

    /// Polls the local devices: answers to other reactors go to the outbox, answers for
    /// this reactor's connections land in `self.responses`.
    pub fn poll_devices(&mut self) {
        if self.devices.is_empty() {
            return;
        }
        let mut out = std::mem::take(&mut self.scratch);
        for d in self.devices.values_mut() {
            d.poll(&mut out);
        }
        for mut r in out.drain(..) {
            match self.remote_origin.remove(&r.tag) {
                Some(origin) => {
                    // A view of a RAM disk may not leave the thread that writes the disk.
                    r.data_in = r.data_in.map(IoBuf::into_owned_if_view);
                    self.send(origin, Msg::ScsiDone(r))
                }
                None => self.responses.push(r),
            }
        }
        self.scratch = out;
    }

    /// Handles a device-related message from another reactor.
    pub fn device_msg(&mut self, msg: Msg) {
        match msg {
            Msg::Scsi {
                target,
                task,
                reply_to,
            } => {
                if let Some(d) = self.devices.get_mut(&target) {
                    self.remote_origin.insert(task.tag, reply_to);
                    d.submit(task);
                }
            }
            Msg::ScsiDone(r) => self.responses.push(r),
            Msg::NexusAdded { target, nexus } => self.nexus_added(target, nexus),
            Msg::NexusRemoved { target, nexus } => self.nexus_removed(target, nexus),
            Msg::LunReset { target, lun, by } => self.lun_reset(target, lun, by),
            Msg::TargetReset { target, by, cold } => self.target_reset(target, by, cold),
            Msg::Close(uid) => self.close_local.push(uid),
            Msg::Resize {
                target,
                lun,
                blocks,
                seq,
                reply_to,
            } => {
                let result = self.resize_local(target, lun, blocks);
                let size = blocks * self.block_size_of(target, lun);
                let answer = super::commands::resize_answer(result, lun, size).to_string();
                self.send(reply_to, Msg::ControlDone { seq, answer });
            }
            Msg::AddDevice {
                target,
                device,
                model,
                seq,
            } => {
                self.devices.insert(target, *device);
                for to in 0..self.outbox.len() {
                    if to != self.me {
                        self.send(to, Msg::Model(model.clone()));
                    }
                }
                self.adopt_model(model.clone());
                let name = model
                    .config()
                    .targets
                    .get(target)
                    .map(|t| t.name.clone())
                    .unwrap_or_default();
                log::info!(
                    "control: target {name} added (id {target}, reactor {})",
                    self.me
                );
                let answer = serde_json::json!({ "ok": true, "target": name, "id": target });
                self.send(
                    0,
                    Msg::ControlDone {
                        seq,
                        answer: answer.to_string(),
                    },
                );
            }
            Msg::RemoveDevice(target) => self.removing.push(target),
            Msg::Accepted { .. }
            | Msg::Adopt(_)
            | Msg::ControlDone { .. }
            | Msg::Model(_)
            | Msg::ListConnections { .. }
            | Msg::Connections { .. } => {}
        }
    }

    /// Resizes a LUN of a device homed here.
    pub fn resize_local(&mut self, target: TargetId, lun: u64, blocks: u64) -> Result<(), String> {
        self.devices
            .get_mut(&target)
            .ok_or_else(|| format!("target {target} is not homed here"))?
            .resize_lun(lun, blocks)
    }

    /// The block size of a target's LUN, from the configuration.
    fn block_size_of(&self, target: TargetId, lun: u64) -> u64 {
        let cfg = self.model.config();
        cfg.targets
            .get(target)
            .and_then(|t| t.luns.iter().find(|l| l.lun == lun))
            .and_then(|l| cfg.bdevs.iter().find(|b| b.name == l.bdev))
            .map_or(512, |b| u64::from(b.block_size))
    }

    /// Sends a message for a target's device to its home reactor. When this reactor is the
    /// home and has no such device, the target was removed: the message has nowhere to go
    /// (its connection is being closed) and is dropped, never sent round to ourselves.
    fn forward(&mut self, target: TargetId, msg: Msg) {
        let home = self.shared.home_of(target);
        if home == self.me {
            log::debug!("target {target} is gone: dropping a message for its device");
            return;
        }
        self.send(home, msg);
    }

    /// Takes a model from the control plane unless this reactor already has a newer one.
    /// Returns whether it was taken.
    pub fn adopt_model(&mut self, model: Arc<crate::tgt::live::Model>) -> bool {
        if model.version > self.model.version {
            self.model = model;
            true
        } else {
            false
        }
    }

    /// Drops the devices of removed targets whose commands have all finished.
    pub fn reap_removed_devices(&mut self) {
        let mut i = 0;
        while i < self.removing.len() {
            let t = self.removing[i];
            let done = self.devices.get(&t).is_none_or(|d| d.in_flight() == 0);
            if done {
                if let Some(mut d) = self.devices.remove(&t) {
                    d.flush_all();
                    log::info!("control: device of removed target {t} released");
                }
                self.removing.swap_remove(i);
            } else {
                i += 1;
            }
        }
    }

    /// Flushes every local device (shutdown).
    pub fn flush_devices(&mut self) {
        for d in self.devices.values_mut() {
            d.flush_all();
        }
    }
}

impl TargetEnv for ReactorEnv {
    fn global(&self) -> &crate::tgt::Global {
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
        conn_uid: u64,
    ) -> Result<Registered, LoginStatus> {
        let max = self.model.global().max_sessions;
        let reg = self
            .shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(key, conn_uid, max)?;
        if let Some(old) = reg.reinstated {
            // The old connection may live on any reactor or in the parking lot.
            self.close_local.push(old);
            for to in 0..self.outbox.len() {
                if to != self.me {
                    self.send(to, Msg::Close(old));
                }
            }
            let _ = self.shared.park_tx.try_send(ParkMsg::Close(old));
            let _ = self.shared.park_waker.wake();
        }
        Ok(reg)
    }

    fn session_exists(&self, tsih: u16) -> bool {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .exists(tsih)
    }

    fn unregister_session(&mut self, tsih: u16, conn_uid: u64) {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unregister(tsih, conn_uid);
    }

    fn lun_exists(&self, target: TargetId, lun: u64) -> bool {
        self.model.lun_exists(target, lun)
    }

    fn scsi_submit(&mut self, target: TargetId, task: ScsiTask) {
        if let Some(d) = self.devices.get_mut(&target) {
            d.submit(task);
        } else {
            let me = self.me;
            self.forward(
                target,
                Msg::Scsi {
                    target,
                    task,
                    reply_to: me,
                },
            );
        }
    }

    fn nexus_added(&mut self, target: TargetId, nexus: NexusId) {
        match self.devices.get_mut(&target) {
            Some(d) => d.nexus_added(nexus),
            None => self.forward(target, Msg::NexusAdded { target, nexus }),
        }
    }

    fn nexus_removed(&mut self, target: TargetId, nexus: NexusId) {
        match self.devices.get_mut(&target) {
            Some(d) => d.nexus_removed(nexus),
            None => self.forward(target, Msg::NexusRemoved { target, nexus }),
        }
    }

    fn lun_reset(&mut self, target: TargetId, lun: u64, by: NexusId) {
        match self.devices.get_mut(&target) {
            Some(d) => d.lun_reset(lun, by),
            None => self.forward(target, Msg::LunReset { target, lun, by }),
        }
    }

    fn target_reset(&mut self, target: TargetId, by: NexusId, cold: bool) {
        match self.devices.get_mut(&target) {
            Some(d) => d.target_reset(by, cold),
            None => self.forward(target, Msg::TargetReset { target, by, cold }),
        }
    }
}
