//! `dpdk-sys`: our own bindings to the system DPDK.
//!
//! # Build
//! Without the cargo feature `dpdk` this crate is empty apart from [`ENABLED`]: the default
//! build needs no DPDK, and the build dependencies (bindgen, cc, pkg-config) are optional and not
//! even compiled. With the feature, `build.rs`:
//! - finds DPDK with pkg-config (`libdpdk`, shared libraries) and links what it prints;
//! - runs bindgen over `csrc/wrapper.h` with an allowlist (EAL init, ethdev control path,
//!   mempool creation, the flag macros we use): the bindings stay ~1,400 lines;
//! - compiles `csrc/shim.c`, real symbols named `dpdk_sys_*` for DPDK's static-inline fast path
//!   (`rte_eth_rx_burst`, `rte_eth_tx_burst`, `rte_eth_tx_prepare`, `rte_pktmbuf_alloc`,
//!   `rte_pktmbuf_free`, `rte_pktmbuf_mtod`, `rte_pktmbuf_append`, data_len/pkt_len/ol_flags,
//!   `rte_errno`, `rte_lcore_id`, `rte_socket_id`). `rte_mbuf` and `rte_mempool` are opaque
//!   here: only the shim touches their fields, so their layout never leaks into Rust.
//! - `RTE_ETH_{RX,TX}_OFFLOAD_*` and `RTE_ETH_RSS_*` are `RTE_BIT64()` expressions that bindgen
//!   cannot evaluate: the wrapper re-exports the ones we use as `DPDK_SYS_*` enumerators, and this
//!   file gives them their DPDK names again as `u64` constants (values come from the headers).
//!
//! # Supported DPDK versions
//! DPDK 22.11 LTS is tested (Debian 12's `libdpdk-dev` 22.11.x, ABI 23). The API we bind
//! (`RTE_ETH_*` names, `rte_eth_rxmode::mtu`, `rte_eth_dev_stop` returning `int`) exists since
//! 21.11, and `build.rs` requires >= 22.11. Later LTS releases (23.11, 24.11) are expected to
//! build because nothing below depends on `rte_mbuf`'s layout, but they are untested.
//!
//! # Drivers (PMDs) with Debian's shared DPDK
//! Debian builds DPDK as shared libraries with every driver a plugin in
//! `/usr/lib/x86_64-linux-gnu/dpdk/pmds-23.0` (`RTE_EAL_PMD_PATH`). Because our binary links
//! `librte_eal.so`, EAL's `eal_plugins_init()` loads that whole directory by itself at
//! `rte_eal_init()`: `--vdev=net_tap0,iface=NAME` (and `net_af_packet`, `net_ring`, PCI PMDs,
//! and the `mempool_ring` handler that every `rte_pktmbuf_pool_create` needs) work with no `-d`
//! argument and no extra link flags. Tested EAL arguments:
//! `prog -l 0 --no-pci --no-huge -m 256 --vdev=net_tap0,iface=dpdktest0 --file-prefix P`.
//! (Verified: the test binary's DT_NEEDED holds only eal/ethdev/mbuf/mempool/ring/net/kvargs/
//! telemetry/meter, yet net_tap probes.) net_tap logs "failed to create multiq qdisc ...
//! Disabling rte flow support" when the kernel lacks `sch_multiq`: harmless, we use no rte_flow.
//! Two caveats: a driver whose own dependencies are missing is skipped with a log line, not an
//! error; and with a static DPDK (or a DPDK installed elsewhere, found through
//! `PKG_CONFIG_PATH`), pass `-d <pmd dir or .so>` explicitly, since the plugin directory is then
//! the one compiled into that DPDK.
//!
//! # Safety
//! Everything here is a raw FFI declaration: callers follow DPDK's rules (EAL initialised once
//! per process, one thread at a time per RX/TX queue, mbufs owned by exactly one party). The
//! safe wrapper is `dataplane::net::dpdk`.
#![no_std]

/// True when the crate was built with the `dpdk` feature (real bindings linked in).
pub const ENABLED: bool = cfg!(feature = "dpdk");

#[cfg(feature = "dpdk")]
#[allow(
    non_upper_case_globals,
    non_camel_case_types,
    non_snake_case,
    dead_code,
    unused_imports,
    unsafe_op_in_unsafe_fn,
    missing_docs,
    clippy::all,
    clippy::pedantic,
    clippy::nursery,
    rustdoc::all
)]
mod bindings {
    include!(concat!(env!("OUT_DIR"), "/bindings.rs"));
}
#[cfg(feature = "dpdk")]
pub use bindings::*;

/// `RTE_BIT64()` flags under their DPDK names, as `u64` (see the crate docs).
#[cfg(feature = "dpdk")]
mod flags {
    use super::bindings::*;

    pub const RTE_ETH_RX_OFFLOAD_IPV4_CKSUM: u64 = DPDK_SYS_RX_OFFLOAD_IPV4_CKSUM as u64;
    pub const RTE_ETH_RX_OFFLOAD_UDP_CKSUM: u64 = DPDK_SYS_RX_OFFLOAD_UDP_CKSUM as u64;
    pub const RTE_ETH_RX_OFFLOAD_TCP_CKSUM: u64 = DPDK_SYS_RX_OFFLOAD_TCP_CKSUM as u64;
    pub const RTE_ETH_RX_OFFLOAD_SCATTER: u64 = DPDK_SYS_RX_OFFLOAD_SCATTER as u64;
    pub const RTE_ETH_RX_OFFLOAD_RSS_HASH: u64 = DPDK_SYS_RX_OFFLOAD_RSS_HASH as u64;
    pub const RTE_ETH_TX_OFFLOAD_IPV4_CKSUM: u64 = DPDK_SYS_TX_OFFLOAD_IPV4_CKSUM as u64;
    pub const RTE_ETH_TX_OFFLOAD_UDP_CKSUM: u64 = DPDK_SYS_TX_OFFLOAD_UDP_CKSUM as u64;
    pub const RTE_ETH_TX_OFFLOAD_TCP_CKSUM: u64 = DPDK_SYS_TX_OFFLOAD_TCP_CKSUM as u64;
    pub const RTE_ETH_TX_OFFLOAD_TCP_TSO: u64 = DPDK_SYS_TX_OFFLOAD_TCP_TSO as u64;
    pub const RTE_ETH_TX_OFFLOAD_MULTI_SEGS: u64 = DPDK_SYS_TX_OFFLOAD_MULTI_SEGS as u64;
    pub const RTE_ETH_TX_OFFLOAD_MBUF_FAST_FREE: u64 = DPDK_SYS_TX_OFFLOAD_MBUF_FAST_FREE as u64;
    pub const RTE_ETH_RSS_IP: u64 = DPDK_SYS_RSS_IP as u64;
    pub const RTE_ETH_RSS_TCP: u64 = DPDK_SYS_RSS_TCP as u64;
    pub const RTE_ETH_RSS_UDP: u64 = DPDK_SYS_RSS_UDP as u64;
}
#[cfg(feature = "dpdk")]
pub use flags::*;
