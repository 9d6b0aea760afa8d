//! What the reactors share, and the messages they exchange.
//!
//! Reactors never share mutable state on the I/O path: a SCSI device belongs to one reactor
//! (its home) and other reactors reach it with messages over bounded crossbeam channels. The
//! only lock, around the session registry, is taken at login and logout, never per command.

use crate::iscsi::conn::Connection;
use crate::iscsi::TargetId;
use crate::scsi::{ItNexus, NexusId, ScsiResponse, ScsiTask};
use crate::tgt::live::{Model, Registry};
use crossbeam_channel::Sender;
use mio::net::TcpStream;
use mio::Waker;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Capacity of each reactor's inbox. A full inbox makes senders keep messages in their own
/// outbox and retry, so no reactor ever blocks on another.
pub const INBOX_CAPACITY: usize = 8192;

/// A connection moving between threads (placement, parking, waking).
pub struct Moving {
    pub stream: TcpStream,
    pub conn: Connection,
}

/// Which reset a task management function asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reset {
    Lun(u64),
    Target { cold: bool },
}

/// Messages to a reactor.
pub enum Msg {
    /// A freshly accepted socket to serve.
    Accepted {
        stream: TcpStream,
        peer: SocketAddr,
        local: SocketAddr,
        pg_tag: u16,
        ticket: Option<AddressTicket>,
    },
    /// An existing connection to take over (woken from the parking lot).
    Adopt(Box<Moving>),
    /// A command for a device homed on the receiving reactor; answer to `reply_to`.
    Scsi {
        target: TargetId,
        task: ScsiTask,
        reply_to: usize,
    },
    /// The answer to a forwarded command.
    ScsiDone(ScsiResponse),
    NexusAdded {
        target: TargetId,
        nexus: NexusId,
        it: ItNexus,
    },
    NexusRemoved {
        target: TargetId,
        nexus: NexusId,
    },
    /// A reset; once done, the device answers `ack` (like a command's tag) to `reply_to`.
    Reset {
        target: TargetId,
        reset: Reset,
        by: NexusId,
        ack: u64,
        reply_to: usize,
    },
    /// Close this connection: its session was reinstated (false), or a new connection
    /// with its CID replaced it (true: connection reinstatement, its tasks are kept at
    /// ERL 2).
    Close(u64, bool),
    /// The answer to control command `seq`, for reactor 0 to write on the response ring.
    ControlDone {
        seq: u64,
        answer: String,
    },
    /// The control plane changed the model: use this one from now on (and close the
    /// connections of targets it removed).
    Model(Arc<Model>),
    /// The first half of a configuration change (control command `seq`), for a home
    /// reactor: LUNs to install (a new target's device is created by its first) and LUNs
    /// to resize (target, LUN, blocks). Answered with [`Msg::Prepared`]; the new model
    /// follows once every home has answered.
    Prepare {
        seq: u64,
        luns: Vec<LunWork>,
        resize: Vec<(TargetId, u64, u64)>,
    },
    /// A home reactor did its part of change `seq` (with what went wrong, if anything).
    Prepared {
        seq: u64,
        errors: Vec<String>,
    },
    /// The block device of a removed LUN, idle and flushed, back to reactor 0 (which keeps
    /// it while the model still defines it, else closes it).
    BdevReleased(Box<dyn crate::bdev::BlockDevice>),
    /// List your connections for control command `seq` (answer to reactor 0).
    ListConnections {
        seq: u64,
    },
    /// One reactor's part of the answer to `seq`: JSON objects, one per connection.
    Connections {
        seq: u64,
        list: Vec<String>,
    },
}

/// A LUN for a home reactor to install, its bdev already opened.
pub struct LunWork {
    pub target: TargetId,
    pub lun: u64,
    pub bdev: Box<dyn crate::bdev::BlockDevice>,
    pub identity: crate::scsi::LunIdentity,
    /// Replaces the LUN of that number when the new model arrives.
    pub replace: bool,
}

/// What connections are counted by, for `max_connections_per_address` and
/// `max_connections_per_portal_group`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CountKey {
    Address(std::net::IpAddr),
    PortalGroup(u16),
}

/// Connections per peer address and per portal group (taken at accept, never per
/// command).
#[derive(Default)]
pub struct AddressCounts(Mutex<std::collections::HashMap<CountKey, u32>>);

/// One connection's places in [`AddressCounts`]; given back when dropped (with the
/// connection, wherever that happens).
pub struct AddressTicket {
    counts: Arc<AddressCounts>,
    keys: Vec<CountKey>,
}

impl AddressCounts {
    /// Places for one more connection under each key, unless one of them has its cap
    /// already (0: no limit); then the key that is full.
    pub fn take(self: &Arc<Self>, wanted: &[(CountKey, u32)]) -> Result<AddressTicket, CountKey> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        for (k, max) in wanted {
            if *max > 0 && m.get(k).copied().unwrap_or(0) >= *max {
                return Err(*k);
            }
        }
        for (k, _) in wanted {
            *m.entry(*k).or_insert(0) += 1;
        }
        Ok(AddressTicket {
            counts: self.clone(),
            keys: wanted.iter().map(|(k, _)| *k).collect(),
        })
    }

    /// Connections counted under `key` now.
    pub fn count(&self, key: CountKey) -> u32 {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.get(&key).copied().unwrap_or(0)
    }
}

impl Drop for AddressTicket {
    fn drop(&mut self) {
        let mut m = self.counts.0.lock().unwrap_or_else(|e| e.into_inner());
        for k in &self.keys {
            if let Some(n) = m.get_mut(k) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    m.remove(k);
                }
            }
        }
    }
}

/// Messages to the parking lot.
pub enum ParkMsg {
    Park(Box<Moving>),
    Close(u64),
}

/// One reactor's mailbox as others see it.
pub struct Mailbox {
    pub tx: Sender<Msg>,
    pub waker: Arc<Waker>,
    /// Connections owned plus commands in flight: the placement metric.
    pub load: AtomicUsize,
    /// Set while the reactor sleeps in epoll: only then does a sender need to wake it.
    pub sleeping: AtomicBool,
}

/// State shared by every reactor and the parking lot.
pub struct Shared {
    /// The model the dataplane started with; each reactor keeps its own current copy
    /// (`ReactorEnv::model`), replaced by [`Msg::Model`] when the control plane changes it.
    pub model: Arc<Model>,
    /// Login and logout only: the lock is never taken on the I/O path.
    pub registry: Mutex<Registry>,
    pub mailboxes: Vec<Mailbox>,
    pub park_tx: Sender<ParkMsg>,
    pub park_waker: Arc<Waker>,
    next_uid: AtomicU64,
    pub stop: &'static AtomicBool,
    /// Connections parked, and connections woken from the parking lot (statistics).
    pub parked_total: AtomicU64,
    pub woken_total: AtomicU64,
    /// The control segment (statistics, heartbeat), when it could be created.
    pub segment: Option<control::Segment>,
    /// Connections per peer address.
    pub per_address: Arc<AddressCounts>,
}

impl Shared {
    pub fn new(
        model: Model,
        mailboxes: Vec<Mailbox>,
        park_tx: Sender<ParkMsg>,
        park_waker: Arc<Waker>,
        stop: &'static AtomicBool,
        segment: Option<control::Segment>,
    ) -> Self {
        Shared {
            model: Arc::new(model),
            registry: Mutex::new(Registry::new()),
            mailboxes,
            park_tx,
            park_waker,
            next_uid: AtomicU64::new(1),
            stop,
            parked_total: AtomicU64::new(0),
            woken_total: AtomicU64::new(0),
            segment,
            per_address: Arc::new(AddressCounts::default()),
        }
    }

    /// A connection id unique across reactors (also the I_T nexus id).
    pub fn new_uid(&self) -> u64 {
        self.next_uid.fetch_add(1, Ordering::Relaxed)
    }

    /// The reactor that owns target `t`'s device.
    pub fn home_of(&self, t: TargetId) -> usize {
        t % self.mailboxes.len()
    }

    /// The reactor with the least load (ties go to the lowest index).
    pub fn least_loaded(&self) -> usize {
        let mut best = 0;
        let mut best_load = usize::MAX;
        for (i, m) in self.mailboxes.iter().enumerate() {
            let l = m.load.load(Ordering::Relaxed);
            if l < best_load {
                best = i;
                best_load = l;
            }
        }
        best
    }

    /// Wakes reactor `i` if it sleeps in epoll.
    pub fn wake(&self, i: usize) {
        let m = &self.mailboxes[i];
        if m.sleeping.load(Ordering::SeqCst) {
            let _ = m.waker.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_counts_cap_and_give_back() {
        let c = Arc::new(AddressCounts::default());
        let ip: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let (a, g) = (CountKey::Address(ip), CountKey::PortalGroup(1));
        let t1 = c.take(&[(a, 2), (g, 3)]).unwrap();
        let t2 = c.take(&[(a, 2), (g, 3)]).unwrap();
        assert_eq!(c.take(&[(a, 2), (g, 3)]).err(), Some(a));
        // Another address through the same group: the group's cap binds next.
        let other = CountKey::Address("10.0.0.2".parse().unwrap());
        let t3 = c.take(&[(other, 0), (g, 3)]).unwrap();
        assert_eq!(c.take(&[(other, 0), (g, 3)]).err(), Some(g));
        assert_eq!((c.count(a), c.count(g)), (2, 3));
        drop(t1);
        assert_eq!((c.count(a), c.count(g)), (1, 2));
        drop((t2, t3));
        assert_eq!((c.count(a), c.count(g), c.count(other)), (0, 0, 0));
        // 0: no limit.
        let many: Vec<_> = (0..100).map(|_| c.take(&[(a, 0)]).unwrap()).collect();
        assert_eq!(c.count(a), 100);
        drop(many);
        assert_eq!(c.count(a), 0);
    }
}
