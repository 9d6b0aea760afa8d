//! Transports: how a connection's bytes reach the protocol core.
//!
//! Today the kernel TCP transport ([`tcp`]); the smoltcp transports over DPDK and TAP arrive
//! with their own issue behind the same connection contract (see `iscsi::conn`).

pub mod tcp;
