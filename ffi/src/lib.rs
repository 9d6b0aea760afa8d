//! `dpdk-sys`: our own bindings to the system DPDK.
//!
//! The real bindings (bindgen over the headers found with pkg-config, plus a C shim for DPDK's
//! static-inline fast-path functions) arrive with the DPDK transport issue, behind the cargo
//! feature `dpdk`. Until then this crate is empty so that the default build never needs DPDK.

/// True when the crate was built with the `dpdk` feature (real bindings linked in).
pub const ENABLED: bool = cfg!(feature = "dpdk");
