//! The parking lot: idle connections wait here in their own epoll instead of in a reactor.
//! When one becomes readable (or its keepalive needs a ping) it is handed to the reactor with
//! the least load at that moment, so connections that come back to life spread over the
//! reactors by current load rather than by where they happened to start.

use super::shared::{Moving, Msg, ParkMsg, Shared};
use crate::iscsi::conn::CloseReason;
use crossbeam_channel::Receiver;
use mio::{Events, Interest, Poll, Token};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The token of the parking lot's waker.
pub const WAKER_TOKEN: Token = Token(usize::MAX);
const TICK: Duration = Duration::from_millis(500);

pub struct ParkingLot {
    poll: Poll,
    rx: Receiver<ParkMsg>,
    shared: Arc<Shared>,
    parked: HashMap<Token, Box<Moving>>,
    by_uid: HashMap<u64, Token>,
    next_token: usize,
}

impl ParkingLot {
    pub fn new(poll: Poll, rx: Receiver<ParkMsg>, shared: Arc<Shared>) -> Self {
        ParkingLot {
            poll,
            rx,
            shared,
            parked: HashMap::new(),
            by_uid: HashMap::new(),
            next_token: 0,
        }
    }

    /// Runs until the dataplane stops; parked connections are then closed.
    pub fn run(mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(256);
        let mut last_tick = Instant::now();
        while !self.shared.stop.load(Ordering::Relaxed) {
            match self
                .poll
                .poll(&mut events, Some(Duration::from_millis(100)))
            {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            let mut wake: Vec<Token> = Vec::new();
            for ev in events.iter() {
                if ev.token() != WAKER_TOKEN {
                    wake.push(ev.token());
                }
            }
            while let Ok(m) = self.rx.try_recv() {
                match m {
                    ParkMsg::Park(mut moving) => {
                        let token = Token(self.next_token);
                        self.next_token = self.next_token.wrapping_add(1) % (usize::MAX - 1);
                        if let Err(e) = self.poll.registry().register(
                            &mut moving.stream,
                            token,
                            Interest::READABLE,
                        ) {
                            log::warn!("cannot park conn {}: {e}", moving.conn.uid());
                            moving.conn.force_close(CloseReason::PeerClosed);
                            self.hand_back(moving);
                            continue;
                        }
                        self.by_uid.insert(moving.conn.uid(), token);
                        self.parked.insert(token, moving);
                    }
                    ParkMsg::Close(uid) => {
                        if let Some(&t) = self.by_uid.get(&uid) {
                            if let Some(m) = self.parked.get_mut(&t) {
                                m.conn.force_close(CloseReason::Reinstated);
                            }
                            wake.push(t);
                        }
                    }
                }
            }
            let now = Instant::now();
            if now.duration_since(last_tick) >= TICK {
                last_tick = now;
                for (t, m) in self.parked.iter_mut() {
                    m.conn.on_tick(now);
                    if m.conn.has_tx() || m.conn.wants_close().is_some() {
                        wake.push(*t);
                    }
                }
            }
            for t in wake {
                if let Some(mut m) = self.parked.remove(&t) {
                    self.by_uid.remove(&m.conn.uid());
                    let _ = self.poll.registry().deregister(&mut m.stream);
                    self.shared.woken_total.fetch_add(1, Ordering::Relaxed);
                    self.hand_back(m);
                }
            }
        }
        Ok(())
    }

    /// Gives a connection to the least-loaded reactor.
    fn hand_back(&self, m: Box<Moving>) {
        let to = self.shared.least_loaded();
        // Count it at once so a burst of wakeups spreads instead of piling on one reactor.
        self.shared.mailboxes[to]
            .load
            .fetch_add(1, Ordering::Relaxed);
        let mut msg = Msg::Adopt(m);
        // The inbox is bounded; parked connections are few and the reactors drain their
        // inboxes every iteration, so retrying briefly is enough.
        for _ in 0..1000 {
            match self.shared.mailboxes[to].tx.try_send(msg) {
                Ok(()) => {
                    let _ = self.shared.mailboxes[to].waker.wake();
                    return;
                }
                Err(crossbeam_channel::TrySendError::Full(back)) => {
                    msg = back;
                    std::thread::sleep(Duration::from_micros(100));
                }
                Err(crossbeam_channel::TrySendError::Disconnected(_)) => return,
            }
        }
        log::warn!("reactor {to} inbox stayed full; dropping a woken connection");
    }
}
