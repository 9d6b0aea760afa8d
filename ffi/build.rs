//! Build script of `dpdk-sys`.
//!
//! Without the cargo feature `dpdk` it does nothing (the build dependencies are optional and not
//! even compiled), so the default build never needs DPDK. With the feature it:
//! 1. finds DPDK with pkg-config (`libdpdk`, shared libraries) and emits its link flags,
//! 2. compiles `csrc/shim.c` (real symbols for DPDK's static-inline fast path) with `cc`,
//! 3. runs bindgen over `csrc/wrapper.h`, allowlisting only what the dataplane uses.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "dpdk")]
    dpdk::build();
}

#[cfg(feature = "dpdk")]
mod dpdk {
    use std::env;
    use std::path::PathBuf;

    /// Oldest DPDK whose ethdev API (`RTE_ETH_*` names, `rte_eth_rxmode::mtu`) we bind.
    const MIN_DPDK: &str = "22.11";

    pub fn build() {
        println!("cargo:rerun-if-changed=csrc/wrapper.h");
        println!("cargo:rerun-if-changed=csrc/shim.c");
        println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

        let lib = pkg_config::Config::new()
            .atleast_version(MIN_DPDK)
            .probe("libdpdk")
            .unwrap_or_else(|e| {
                panic!(
                    "dpdk-sys: feature `dpdk` needs DPDK >= {MIN_DPDK} visible to pkg-config as \
                     `libdpdk` (Debian: apt-get install libdpdk-dev pkg-config): {e}"
                )
            });
        println!("cargo:version={}", lib.version);

        // pkg-config's cflags also carry `-include rte_config.h` and `-march=...`: pass them to
        // both the C compiler and clang so the shim and the bindings see the same layout.
        let cflags = cflags();

        let mut cc = cc::Build::new();
        cc.file("csrc/shim.c")
            .include("csrc")
            .warnings(true)
            .opt_level(3);
        for path in &lib.include_paths {
            cc.include(path);
        }
        for flag in &cflags {
            if !flag.starts_with("-I") {
                cc.flag(flag);
            }
        }
        cc.compile("dpdk_sys_shim");

        let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR is set by cargo"));
        let mut builder = bindgen::Builder::default()
            .header("csrc/wrapper.h")
            // The workspace's rust-version (1.80): no `unsafe extern` blocks.
            .rust_target(
                bindgen::RustTarget::stable(80, 0)
                    .unwrap_or_else(|_| panic!("bindgen does not know Rust 1.80")),
            )
            .clang_args(&cflags)
            .clang_arg("-Icsrc")
            .parse_callbacks(Box::new(bindgen::CargoCallbacks::new()))
            .use_core()
            .layout_tests(false)
            .derive_default(true)
            .derive_debug(false)
            .generate_comments(false)
            .prepend_enum_name(false)
            .default_enum_style(bindgen::EnumVariation::Consts)
            // Fast-path structures are touched only by the C shim: keep them opaque (size and
            // alignment only) so the bindings stay small and independent of their layout.
            .opaque_type("rte_mbuf")
            .opaque_type("rte_mempool")
            .opaque_type("rte_eth_dev_portconf")
            .opaque_type("rte_eth_switch_info")
            .opaque_type("rte_eth_dev_data")
            .opaque_type("rte_device")
            // Anonymous members of the opaque types above are generated anyway: drop them.
            .blocklist_type("rte_mbuf_.*")
            .blocklist_type("rte_mempool_.*")
            .parse_callbacks(Box::new(U64Flags));
        for f in ALLOW_FUNCTIONS {
            builder = builder.allowlist_function(f);
        }
        for t in ALLOW_TYPES {
            builder = builder.allowlist_type(t);
        }
        for v in ALLOW_VARS {
            builder = builder.allowlist_var(v);
        }
        let bindings = builder
            .generate()
            .unwrap_or_else(|e| panic!("dpdk-sys: bindgen over csrc/wrapper.h failed: {e}"));
        bindings
            .write_to_file(out.join("bindings.rs"))
            .expect("dpdk-sys: cannot write bindings.rs");
    }

    /// DPDK's offload flag macros are 64-bit masks: give them all the type `u64` (bindgen would
    /// pick `u32` for those whose value happens to fit).
    #[derive(Debug)]
    struct U64Flags;

    impl bindgen::callbacks::ParseCallbacks for U64Flags {
        fn int_macro(&self, name: &str, _value: i64) -> Option<bindgen::callbacks::IntKind> {
            (name.starts_with("RTE_MBUF_F_") || name.starts_with("RTE_ETH_RSS_"))
                .then_some(bindgen::callbacks::IntKind::U64)
        }
    }

    /// The cflags of `libdpdk`, as pkg-config prints them.
    fn cflags() -> Vec<String> {
        let pc = env::var("PKG_CONFIG").unwrap_or_else(|_| "pkg-config".into());
        let out = std::process::Command::new(pc)
            .args(["--cflags", "libdpdk"])
            .output()
            .expect("dpdk-sys: cannot run pkg-config --cflags libdpdk");
        assert!(
            out.status.success(),
            "dpdk-sys: pkg-config --cflags libdpdk failed"
        );
        let text = String::from_utf8(out.stdout).expect("pkg-config output is UTF-8");
        // `-include rte_config.h` stays two consecutive args: gcc and clang both take that form.
        text.split_whitespace().map(str::to_owned).collect()
    }

    const ALLOW_FUNCTIONS: &[&str] = &[
        "dpdk_sys_.*",
        "rte_version",
        "rte_strerror",
        "rte_eal_init",
        "rte_eal_cleanup",
        "rte_eal_process_type",
        "rte_thread_register",
        "rte_thread_unregister",
        "rte_lcore_count",
        "rte_eth_dev_count_avail",
        "rte_eth_dev_is_valid_port",
        "rte_eth_dev_get_port_by_name",
        "rte_eth_dev_get_name_by_port",
        "rte_eth_dev_info_get",
        "rte_eth_dev_configure",
        "rte_eth_dev_adjust_nb_rx_tx_desc",
        "rte_eth_rx_queue_setup",
        "rte_eth_tx_queue_setup",
        "rte_eth_dev_set_mtu",
        "rte_eth_dev_get_mtu",
        "rte_eth_dev_start",
        "rte_eth_dev_stop",
        "rte_eth_dev_close",
        "rte_eth_dev_socket_id",
        "rte_eth_macaddr_get",
        "rte_eth_link_get_nowait",
        "rte_eth_stats_get",
        "rte_eth_stats_reset",
        "rte_eth_promiscuous_enable",
        "rte_eth_promiscuous_disable",
        "rte_pktmbuf_pool_create",
        "rte_pktmbuf_free_bulk",
        "rte_mempool_free",
        "rte_mempool_avail_count",
        "rte_mempool_in_use_count",
    ];

    const ALLOW_TYPES: &[&str] = &[
        "rte_eth_conf",
        "rte_eth_dev_info",
        "rte_eth_rxconf",
        "rte_eth_txconf",
        "rte_eth_link",
        "rte_eth_stats",
        "rte_ether_addr",
        "rte_eth_rx_mq_mode",
        "rte_eth_tx_mq_mode",
        "rte_proc_type_t",
        "dpdk_sys_eth_.*",
    ];

    const ALLOW_VARS: &[&str] = &[
        "RTE_VER_.*",
        "RTE_MAX_ETHPORTS",
        "RTE_MAX_LCORE",
        "RTE_ETH_NAME_MAX_LEN",
        "RTE_ETHER_ADDR_LEN",
        "RTE_ETHER_HDR_LEN",
        "RTE_ETHER_MTU",
        "RTE_ETH_LINK_UP",
        "RTE_ETH_LINK_DOWN",
        "RTE_MEMPOOL_NAMESIZE",
        "RTE_MEMPOOL_CACHE_MAX_SIZE",
        "RTE_PKTMBUF_HEADROOM",
        "RTE_MBUF_DEFAULT_DATAROOM",
        "RTE_MBUF_DEFAULT_BUF_SIZE",
        "RTE_MBUF_F_RX_IP_CKSUM_.*",
        "RTE_MBUF_F_RX_L4_CKSUM_.*",
        "RTE_MBUF_F_TX_IPV4",
        "RTE_MBUF_F_TX_IPV6",
        "RTE_MBUF_F_TX_IP_CKSUM",
        "RTE_MBUF_F_TX_TCP_CKSUM",
        "RTE_MBUF_F_TX_UDP_CKSUM",
        "RTE_MBUF_F_TX_L4_MASK",
        "SOCKET_ID_ANY",
        "LCORE_ID_ANY",
        "DPDK_SYS_.*",
    ];
}
