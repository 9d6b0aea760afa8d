//! The [`TargetEnv`] a reactor gives its connections: the shared model for logins and
//! discovery, the devices homed on this reactor, and an outbox for the others.

use super::shared::{LunWork, Msg, ParkMsg, Reset, Shared};
use crate::bdev::BlockDevice;
use crate::iscsi::conn::OrphanTask;
use crate::iscsi::params::SessionParams;
use crate::iscsi::{
    DiscoveryEntry, Joined, LoginStatus, Registered, SessionKey, TargetEnv, TargetId, TargetInfo,
};
use crate::mem::IoBuf;
use crate::scsi::{Device, ItNexus, NexusId, ScsiResponse, ScsiTask};
use crossbeam_channel::TrySendError;
use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::os::fd::RawFd;
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
    /// Connections of this reactor to close: their sessions were reinstated (false), or a
    /// new connection took their CID (true).
    pub close_local: Vec<(u64, bool)>,
    /// Responses to this reactor's own commands, ready to route to connections.
    pub responses: Vec<ScsiResponse>,
    scratch: Vec<ScsiResponse>,
    /// Replacement LUNs of a change in progress, swapped in when its model arrives.
    staged: Vec<LunWork>,
    /// Reactor 0: open bdevs the model defines that no LUN uses (`bdev add`, LUNs removed
    /// with their bdev kept), ready to be mapped.
    pub pool: HashMap<String, Box<dyn BlockDevice>>,
    /// The reactor's epoll, to watch the completion fds of devices that come and go.
    pub registry: Option<mio::Registry>,
    /// Completion fds watched now.
    watched: HashSet<RawFd>,
    /// The command windows of this reactor's sessions with several connections (MC/S),
    /// by TSIH: ExpCmdSN and MaxCmdSN, session-wide.
    pub windows: HashMap<u16, (u32, u32)>,
    /// ERL 2: tasks of failed connections waiting for TASK REASSIGN, by TSIH.
    orphans: HashMap<u16, Orphans>,
    /// Failed connections (uid) whose tasks may still be answered by a device, by TSIH.
    orphan_uids: HashMap<u64, u16>,
    /// Reassigned tasks still in a device: the old tag and the new one.
    redirect: HashMap<u64, u64>,
}

/// The tasks of a session's failed connections, until the session's retention time ends.
struct Orphans {
    tasks: HashMap<u32, (u64, OrphanTask)>,
    until: std::time::Instant,
}

impl ReactorEnv {
    /// A device's answer for a connection that is gone: a reassigned task's goes to its
    /// new connection (Some: route it again), a failed connection's is kept with its
    /// orphan task, anything else is dropped.
    pub fn orphan_response(&mut self, mut r: ScsiResponse) -> Option<ScsiResponse> {
        if let Some(tag) = self.redirect.remove(&r.tag) {
            r.tag = tag;
            return Some(r);
        }
        let uid = r.tag >> 32;
        let tsih = *self.orphan_uids.get(&uid)?;
        if let Some((_, o)) = self
            .orphans
            .get_mut(&tsih)
            .and_then(|o| o.tasks.get_mut(&(r.tag as u32)))
        {
            o.answered(r);
        }
        None
    }

    /// Ends the retention of orphan tasks past their time; a session no connection came
    /// back to ends then.
    pub fn expire_orphans(&mut self, now: std::time::Instant) {
        let expired: Vec<u16> = self
            .orphans
            .iter()
            .filter(|(_, o)| now >= o.until)
            .map(|(t, _)| *t)
            .collect();
        for tsih in expired {
            if let Some(o) = self.orphans.remove(&tsih) {
                if !o.tasks.is_empty() {
                    log::info!(
                        "session {tsih}: {} tasks not reassigned in time, dropped",
                        o.tasks.len()
                    );
                }
            }
            self.orphan_uids.retain(|_, t| *t != tsih);
            let ended = self
                .shared
                .registry
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .end_if_empty(tsih);
            if let Some((Some(target), nexus)) = ended {
                log::info!("session {tsih}: ended (no connection came back)");
                self.windows.remove(&tsih);
                self.nexus_removed(target, nexus);
            }
        }
    }

    /// A reset on the target's device (here, or sent to its home); its acknowledgement
    /// `ack` goes to reactor `reply_to` once the device has done it, or at once when the
    /// target is gone.
    fn reset(&mut self, target: TargetId, reset: Reset, by: NexusId, ack: u64, reply_to: usize) {
        match self.devices.get_mut(&target) {
            Some(d) => {
                match reset {
                    Reset::Lun(lun) => d.lun_reset(lun, by),
                    Reset::Target { cold } => d.target_reset(by, cold),
                }
                if reply_to != self.me {
                    self.remote_origin.insert(ack, reply_to);
                }
                d.acknowledge(ack);
            }
            None if self.shared.home_of(target) == self.me => {
                // The target is gone: answer so the TMF is not left waiting.
                let r = Device::gone_response(ack);
                if reply_to == self.me {
                    self.responses.push(r);
                } else {
                    self.send(reply_to, Msg::ScsiDone(r));
                }
            }
            None => self.forward(
                target,
                Msg::Reset {
                    target,
                    reset,
                    by,
                    ack,
                    reply_to,
                },
            ),
        }
    }

    /// Closes connection `uid` wherever it lives (any reactor or the parking lot).
    fn close_anywhere(&mut self, uid: u64, replaced: bool) {
        self.close_local.push((uid, replaced));
        for to in 0..self.outbox.len() {
            if to != self.me {
                self.send(to, Msg::Close(uid, replaced));
            }
        }
        let _ = self.shared.park_tx.try_send(ParkMsg::Close(uid));
        let _ = self.shared.park_waker.wake();
    }

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
            staged: Vec::new(),
            pool: HashMap::new(),
            registry: None,
            watched: HashSet::new(),
            windows: HashMap::new(),
            orphans: HashMap::new(),
            orphan_uids: HashMap::new(),
            redirect: HashMap::new(),
        }
    }

    /// Watches the completion fds of the local devices not watched yet.
    pub fn watch_completions(&mut self) {
        let Some(reg) = self.registry.as_ref() else {
            return;
        };
        for fd in self.devices.values().flat_map(Device::completion_fds) {
            if self.watched.insert(fd) {
                if let Err(e) = reg.register(
                    &mut mio::unix::SourceFd(&fd),
                    super::COMPLETION_TOKEN,
                    mio::Interest::READABLE,
                ) {
                    log::warn!("cannot watch a device's completions: {e}");
                    self.watched.remove(&fd);
                }
            }
        }
    }

    /// Installs this reactor's part of a configuration change; returns what failed.
    pub fn prepare(
        &mut self,
        luns: Vec<LunWork>,
        resize: Vec<(TargetId, u64, u64)>,
    ) -> Vec<String> {
        let mut errors = Vec::new();
        for w in luns {
            if w.replace && self.devices.contains_key(&w.target) {
                self.staged.push(w);
                continue;
            }
            let d = self.devices.entry(w.target).or_default();
            if let Err(e) = d.add_lun(w.lun, w.bdev, w.identity) {
                errors.push(format!("target {} LUN {}: {e}", w.target, w.lun));
            }
        }
        for (t, lun, blocks) in resize {
            if let Err(e) = self.resize_local(t, lun, blocks) {
                errors.push(format!("target {t} LUN {lun}: resize failed: {e}"));
            }
        }
        self.watch_completions();
        errors
    }

    /// Brings the local devices to the current model: staged replacements go in, LUNs the
    /// model no longer has retire (they finish their commands first), devices of removed
    /// targets are dropped once idle.
    fn reconcile_devices(&mut self) {
        for w in std::mem::take(&mut self.staged) {
            match self.devices.get_mut(&w.target) {
                Some(d) => {
                    if let Err(e) = d.replace_lun(w.lun, w.bdev, w.identity) {
                        log::error!("target {} LUN {}: {e}", w.target, w.lun);
                    }
                }
                None => self.release_bdev(w.bdev),
            }
        }
        let model = self.model.clone();
        for (t, d) in self.devices.iter_mut() {
            if !model.is_live(*t) {
                if !self.removing.contains(t) {
                    self.removing.push(*t);
                }
                continue;
            }
            let node = &model.config().targets[*t];
            d.set_ports(node.mappings.iter().map(|m| m.portal_group).collect());
            let want = &node.luns;
            for lun in d.luns() {
                if !want.iter().any(|l| l.lun == lun) {
                    d.remove_lun(lun);
                    log::info!("control: target {t} LUN {lun} removed");
                }
            }
        }
        self.watch_completions();
    }

    /// A bdev leaves this reactor: its completion fd is unwatched (while still open), then
    /// it goes to reactor 0.
    fn release_bdev(&mut self, b: Box<dyn BlockDevice>) {
        if let Some(fd) = b.completion_fd() {
            if self.watched.remove(&fd) {
                if let Some(reg) = self.registry.as_ref() {
                    let _ = reg.deregister(&mut mio::unix::SourceFd(&fd));
                }
            }
        }
        if self.me == 0 {
            self.bdev_returned(b);
        } else {
            self.send(0, Msg::BdevReleased(b));
        }
    }

    /// Reactor 0: a released bdev stays open while the model defines it and no LUN uses
    /// it (it may be mapped again); otherwise it is closed.
    pub fn bdev_returned(&mut self, b: Box<dyn BlockDevice>) {
        let name = b.name().to_string();
        let m = &self.model;
        let defined = m.config().bdevs.iter().any(|c| c.name == name);
        let mapped = m
            .live_targets()
            .any(|(_, t)| t.luns.iter().any(|l| l.bdev == name));
        if defined && !mapped && !self.pool.contains_key(&name) {
            log::info!("control: bdev {name} is free");
            self.pool.insert(name, b);
        } else {
            log::info!("control: bdev {name} closed");
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
                } else {
                    // Removed while the command travelled: answer rather than drop it.
                    let r = Device::gone_response(task.tag);
                    self.send(reply_to, Msg::ScsiDone(r));
                }
            }
            Msg::ScsiDone(r) => self.responses.push(r),
            Msg::NexusAdded { target, nexus, it } => self.nexus_added(target, nexus, it),
            Msg::NexusRemoved { target, nexus } => self.nexus_removed(target, nexus),
            Msg::Reset {
                target,
                reset,
                by,
                ack,
                reply_to,
            } => self.reset(target, reset, by, ack, reply_to),
            Msg::Close(uid, replaced) => self.close_local.push((uid, replaced)),
            Msg::Prepare { seq, luns, resize } => {
                let errors = self.prepare(luns, resize);
                self.send(0, Msg::Prepared { seq, errors });
            }
            Msg::BdevReleased(b) => self.bdev_returned(b),
            Msg::Accepted { .. }
            | Msg::Adopt(_)
            | Msg::ControlDone { .. }
            | Msg::Prepared { .. }
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
            self.reconcile_devices();
            true
        } else {
            false
        }
    }

    /// Drops the devices of removed targets whose commands have all finished, and hands
    /// on the bdevs of removed LUNs that have finished theirs.
    pub fn reap_removed_devices(&mut self) {
        let mut released = Vec::new();
        for d in self.devices.values_mut() {
            released.extend(d.take_released());
        }
        let mut i = 0;
        while i < self.removing.len() {
            let t = self.removing[i];
            let done = self
                .devices
                .get(&t)
                .is_none_or(|d| d.in_flight() == 0 && !d.views_out());
            if done {
                if let Some(mut d) = self.devices.remove(&t) {
                    d.flush_all();
                    log::info!("control: device of removed target {t} released");
                    released.extend(d.into_bdevs());
                }
                self.removing.swap_remove(i);
            } else {
                i += 1;
            }
        }
        for b in released {
            self.release_bdev(b);
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
        cid: u16,
        params: &SessionParams,
        nexus: NexusId,
    ) -> Result<Registered, LoginStatus> {
        let limits = crate::tgt::live::SessionLimits::of(self.model.global());
        let new = crate::tgt::live::NewSession {
            conn_uid,
            cid,
            reactor: self.me,
            params,
            nexus,
        };
        let reg = self
            .shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .register(key, new, limits)?;
        for &old in &reg.reinstated {
            self.close_anywhere(old, false);
        }
        if let Some((old, target, nexus)) = reg.ended {
            // The reinstated session's I_T nexus ends (its connections' teardowns find
            // them no longer part of it), with whatever it kept.
            self.windows.remove(&old);
            self.orphans.remove(&old);
            self.orphan_uids.retain(|_, t| *t != old);
            if let Some(t) = target {
                self.nexus_removed(t, nexus);
            }
        }
        Ok(reg)
    }

    fn session_to_join(
        &self,
        tsih: u16,
        key: &SessionKey,
        cid: u16,
    ) -> Result<SessionParams, LoginStatus> {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .may_join(tsih, key, cid)
            .cloned()
    }

    fn join_session(
        &mut self,
        tsih: u16,
        key: &SessionKey,
        cid: u16,
        conn_uid: u64,
    ) -> Result<Joined, LoginStatus> {
        let joined = self
            .shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join(tsih, key, cid, conn_uid)?;
        if let Some(old) = joined.replaced {
            self.close_anywhere(old, true);
        }
        Ok(joined)
    }

    fn keep_orphans(
        &mut self,
        tsih: u16,
        conn_uid: u64,
        tasks: Vec<OrphanTask>,
        retain: std::time::Duration,
    ) {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .suspend(tsih, conn_uid);
        self.orphan_uids.insert(conn_uid, tsih);
        let o = self.orphans.entry(tsih).or_insert_with(|| Orphans {
            tasks: HashMap::new(),
            until: std::time::Instant::now(),
        });
        o.until = std::time::Instant::now() + retain;
        for t in tasks {
            o.tasks.insert(t.itt(), (conn_uid, t));
        }
    }

    fn reclaim_orphan(&mut self, tsih: u16, itt: u32, new_uid: u64) -> Option<OrphanTask> {
        let (old_uid, o) = self.orphans.get_mut(&tsih)?.tasks.remove(&itt)?;
        if o.in_device() {
            self.redirect.insert(
                (old_uid << 32) | u64::from(itt),
                (new_uid << 32) | u64::from(itt),
            );
        }
        Some(o)
    }

    fn session_has_cid(&self, tsih: u16, cid: u16) -> bool {
        self.shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .has_cid(tsih, cid)
    }

    fn unregister_session(&mut self, tsih: u16, conn_uid: u64) -> bool {
        let lives_on = self
            .shared
            .registry
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unregister(tsih, conn_uid);
        if !lives_on {
            self.windows.remove(&tsih);
        }
        lives_on
    }

    fn lun_exists(&self, target: TargetId, lun: u64) -> bool {
        self.model.lun_exists(target, lun)
    }

    fn auth_policy(&self, target: Option<TargetId>) -> crate::iscsi::chap::AuthPolicy {
        self.model.auth_policy(target)
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

    fn nexus_added(&mut self, target: TargetId, nexus: NexusId, it: ItNexus) {
        match self.devices.get_mut(&target) {
            Some(d) => d.nexus_added(nexus, it),
            None => self.forward(target, Msg::NexusAdded { target, nexus, it }),
        }
    }

    fn nexus_removed(&mut self, target: TargetId, nexus: NexusId) {
        match self.devices.get_mut(&target) {
            Some(d) => d.nexus_removed(nexus),
            None => self.forward(target, Msg::NexusRemoved { target, nexus }),
        }
    }

    fn lun_reset(&mut self, target: TargetId, lun: u64, by: NexusId, ack: u64) {
        let me = self.me;
        self.reset(target, Reset::Lun(lun), by, ack, me);
    }

    fn target_reset(&mut self, target: TargetId, by: NexusId, cold: bool, ack: u64) {
        let me = self.me;
        self.reset(target, Reset::Target { cold }, by, ack, me);
    }
}
