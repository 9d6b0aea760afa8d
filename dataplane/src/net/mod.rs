//! Transports: how a connection's bytes reach the protocol core.
//!
//! - [`tcp`]: kernel TCP through mio (the default).
//! - [`stack`]: a smoltcp TCP/IP stack owned by one reactor, over a packet device: a TAP
//!   interface ([`stack::TapPhy`]) or, with the cargo feature `dpdk`, a DPDK ethdev queue
//!   ([`dpdk`]). The connection code is the same over both (`iscsi::conn` is sans-IO).

#[cfg(feature = "dpdk")]
pub mod dpdk;
pub mod stack;
pub mod tcp;
