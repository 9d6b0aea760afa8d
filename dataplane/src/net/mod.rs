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

/// The EAL arguments for `cfg` (program name first): the reactors' CPUs as the core list,
/// memory, hugepages or not, the file prefix (per instance, so several dataplanes can run),
/// the PCI allow list, then the operator's own arguments.
pub fn eal_args(cfg: &crate::tgt::DpdkConfig, instance: &str, cpus: &[usize]) -> Vec<String> {
    let mut a = vec!["iscsi-tgt".to_string()];
    let list: Vec<String> = cpus.iter().map(|c| c.to_string()).collect();
    a.push("-l".into());
    a.push(if list.is_empty() {
        "0".into()
    } else {
        list.join(",")
    });
    a.push("-m".into());
    a.push(cfg.memory_mib.to_string());
    if cfg.no_huge {
        a.push("--no-huge".into());
    }
    a.push("--file-prefix".into());
    a.push(
        cfg.file_prefix
            .clone()
            .unwrap_or_else(|| format!("iscsi-tgt-{instance}")),
    );
    for p in &cfg.pci_allow {
        a.push("-a".into());
        a.push(p.clone());
    }
    a.push("--log-level=warning".into());
    a.extend(cfg.eal_args.iter().cloned());
    a
}

#[cfg(test)]
mod tests {
    use crate::tgt::DpdkConfig;

    #[test]
    fn eal_args_follow_the_config() {
        let mut c = DpdkConfig::default();
        assert_eq!(
            super::eal_args(&c, "default", &[0, 1]),
            [
                "iscsi-tgt",
                "-l",
                "0,1",
                "-m",
                "512",
                "--file-prefix",
                "iscsi-tgt-default",
                "--log-level=warning"
            ]
        );
        c.no_huge = true;
        c.memory_mib = 256;
        c.file_prefix = Some("p".into());
        c.pci_allow = vec!["0000:3b:00.0".into()];
        c.eal_args = vec!["--no-pci".into(), "--vdev=net_tap0,iface=d0".into()];
        assert_eq!(
            super::eal_args(&c, "x", &[2]).join(" "),
            "iscsi-tgt -l 2 -m 256 --no-huge --file-prefix p -a 0000:3b:00.0 \
             --log-level=warning --no-pci --vdev=net_tap0,iface=d0"
        );
    }
}
