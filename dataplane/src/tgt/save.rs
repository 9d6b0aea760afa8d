//! The configuration written back as TOML (`iscsictl save`): the running model, targets
//! added and removed at run time included, in the form [`super::config`] reads.

use super::{BdevKind, Config, FileEngine, Netmask, Transport};
use std::fmt::Write;

fn q(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn list<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    let v: Vec<String> = items.iter().map(f).collect();
    format!("[{}]", v.join(", "))
}

fn auth_keys(o: &mut String, a: &super::AuthSettings) {
    if let Some(g) = a.group {
        let _ = writeln!(o, "auth_group = {g}");
    }
    for (k, v) in [
        ("require_chap", a.require_chap),
        ("mutual_chap", a.mutual_chap),
        ("disable_chap", a.disable_chap),
    ] {
        if v {
            let _ = writeln!(o, "{k} = true");
        }
    }
}

/// `config` as a TOML file that loads back to the same `Config` (CHAP secrets included:
/// the file is as sensitive as the configuration it came from).
pub fn to_toml(c: &Config) -> String {
    let mut o = String::new();
    let g = &c.global;
    let _ = writeln!(o, "# written by iscsictl save\n\n[global]");
    let _ = writeln!(o, "log_level = {}", q(&g.log_level));
    let _ = writeln!(o, "nop_in_interval = {}", g.nop_in_interval_s);
    let _ = writeln!(o, "nop_in_timeout = {}", g.nop_in_timeout_s);
    let _ = writeln!(o, "max_sessions = {}", g.max_sessions);
    let _ = writeln!(
        o,
        "max_recv_data_segment_length = {}",
        g.max_recv_data_segment_length
    );
    let _ = writeln!(o, "max_burst_length = {}", g.max_burst_length);
    let _ = writeln!(o, "first_burst_length = {}", g.first_burst_length);
    let _ = writeln!(o, "max_outstanding_r2t = {}", g.max_outstanding_r2t);
    let _ = writeln!(o, "immediate_data = {}", g.immediate_data);
    let _ = writeln!(o, "initial_r2t = {}", g.initial_r2t);
    let _ = writeln!(o, "default_time2wait = {}", g.default_time2wait);
    let _ = writeln!(o, "default_time2retain = {}", g.default_time2retain);
    let _ = writeln!(o, "error_recovery_level = {}", g.error_recovery_level);
    let _ = writeln!(o, "max_connections = {}", g.max_connections);
    let _ = writeln!(o, "cpumask = \"{:#x}\"", g.cpumask);
    let _ = writeln!(o, "idle_park_ms = {}", g.idle_park_ms);
    let _ = writeln!(o, "buffer_pool_mib = {}", g.buffer_pool_mib);
    let _ = writeln!(o, "hugepages = {}", g.hugepages);
    let _ = writeln!(o, "poll_spin_us = {}", g.poll_spin_us);
    let _ = writeln!(o, "instance = {}", q(&g.instance));
    let _ = writeln!(o, "state_dir = {}", q(&g.state_dir));
    let _ = writeln!(o, "header_digest = \"{}\"", g.header_digest.name());
    let _ = writeln!(o, "data_digest = \"{}\"", g.data_digest.name());
    let _ = writeln!(o, "login_timeout = {}", g.login_timeout_s);
    let _ = writeln!(o, "pdu_timeout = {}", g.pdu_timeout_s);
    let _ = writeln!(
        o,
        "max_connections_per_address = {}",
        g.max_connections_per_address
    );
    let _ = writeln!(o, "max_sessions_per_target = {}", g.max_sessions_per_target);
    let _ = writeln!(
        o,
        "max_sessions_per_initiator = {}",
        g.max_sessions_per_initiator
    );
    let _ = writeln!(
        o,
        "max_connections_per_portal_group = {}",
        g.max_connections_per_portal_group
    );
    let _ = writeln!(
        o,
        "max_connection_buffer_mib = {}",
        g.max_connection_buffer_mib
    );
    for pg in &c.portal_groups {
        let _ = writeln!(o, "\n[[portal_group]]\ntag = {}", pg.tag);
        let _ = writeln!(o, "portals = {}", list(&pg.portals, |p| q(&p.to_string())));
        if pg.transport != Transport::Kernel {
            let _ = writeln!(o, "transport = {}", q(pg.transport.name()));
        }
        if let Some(u) = &pg.userspace {
            let _ = writeln!(o, "[portal_group.userspace]\ndevice = {}", q(&u.device));
            let _ = writeln!(
                o,
                "addresses = {}",
                list(&u.addresses, |(a, p)| q(&format!("{a}/{p}")))
            );
            if !u.gateways.is_empty() {
                let _ = writeln!(o, "gateways = {}", list(&u.gateways, |g| q(&g.to_string())));
            }
            if let Some(m) = u.mac {
                let mac: Vec<String> = m.iter().map(|b| format!("{b:02x}")).collect();
                let _ = writeln!(o, "mac = {}", q(&mac.join(":")));
            }
            let _ = writeln!(o, "socket_buffer = {}", u.socket_buffer);
            let _ = writeln!(o, "listen_backlog = {}", u.listen_backlog);
            let _ = writeln!(o, "max_connections = {}", u.max_connections);
            let _ = writeln!(o, "mtu = {}", u.mtu);
        }
    }
    for ig in &c.initiator_groups {
        let _ = writeln!(o, "\n[[initiator_group]]\ntag = {}", ig.tag);
        let _ = writeln!(o, "initiators = {}", list(&ig.initiators, |i| q(i)));
        let _ = writeln!(
            o,
            "netmasks = {}",
            list(&ig.netmasks, |m| match m {
                Netmask::Any => q("ANY"),
                Netmask::Cidr { addr, prefix } => q(&format!("{addr}/{prefix}")),
            })
        );
    }
    for g in &c.auth_groups {
        let _ = writeln!(o, "\n[[auth_group]]\ntag = {}", g.tag);
        let _ = writeln!(
            o,
            "secrets = {}",
            list(&g.secrets, |s| {
                let text = |b: &[u8]| q(&String::from_utf8_lossy(b));
                let mut e = format!("{{ user = {}, secret = {}", q(&s.user), text(&s.secret));
                if let (Some(u), Some(m)) = (&s.mutual_user, &s.mutual_secret) {
                    e.push_str(&format!(
                        ", mutual_user = {}, mutual_secret = {}",
                        q(u),
                        text(m)
                    ));
                }
                e + " }"
            })
        );
    }
    if c.discovery_auth != super::AuthSettings::default() {
        let _ = writeln!(o, "\n[discovery]");
        auth_keys(&mut o, &c.discovery_auth);
    }
    for b in &c.bdevs {
        let _ = writeln!(o, "\n[[bdev]]\nname = {}", q(&b.name));
        match &b.kind {
            BdevKind::Malloc { size } => {
                let _ = writeln!(o, "type = \"malloc\"\nsize = {size}");
            }
            BdevKind::Null { size } => {
                let _ = writeln!(o, "type = \"null\"\nsize = {size}");
            }
            BdevKind::File {
                path,
                size,
                engine,
                direct,
            } => {
                let _ = writeln!(o, "type = \"file\"\npath = {}", q(&path.to_string_lossy()));
                if let Some(s) = size {
                    let _ = writeln!(o, "size = {s}");
                }
                let e = match engine {
                    FileEngine::Uring => "uring",
                    FileEngine::Threads => "threads",
                };
                let _ = writeln!(o, "engine = \"{e}\"\ndirect = {direct}");
            }
        }
        let _ = writeln!(o, "block_size = {}", b.block_size);
    }
    for t in &c.targets {
        let _ = writeln!(o, "\n[[target]]\nname = {}", q(&t.name));
        if let Some(a) = &t.alias {
            let _ = writeln!(o, "alias = {}", q(a));
        }
        let _ = writeln!(o, "queue_depth = {}", t.queue_depth);
        auth_keys(&mut o, &t.auth);
        let _ = writeln!(
            o,
            "luns = {}",
            list(&t.luns, |l| format!(
                "{{ lun = {}, bdev = {} }}",
                l.lun,
                q(&l.bdev)
            ))
        );
        let _ = writeln!(
            o,
            "mappings = {}",
            list(&t.mappings, |m| format!(
                "{{ portal_group = {}, initiator_group = {} }}",
                m.portal_group, m.initiator_group
            ))
        );
    }
    if let Some(d) = &c.dpdk {
        let _ = writeln!(o, "\n[dpdk]");
        // Empty lists are written as absent: the loader refuses an empty list given.
        if !d.eal_args.is_empty() {
            let _ = writeln!(o, "eal_args = {}", list(&d.eal_args, |a| q(a)));
        }
        if !d.pci_allow.is_empty() {
            let _ = writeln!(o, "pci_allow = {}", list(&d.pci_allow, |a| q(a)));
        }
        let _ = writeln!(o, "no_huge = {}", d.no_huge);
        let _ = writeln!(o, "memory_mib = {}", d.memory_mib);
        if let Some(p) = &d.file_prefix {
            let _ = writeln!(o, "file_prefix = {}", q(p));
        }
        let _ = writeln!(o, "mbufs = {}", d.mbufs);
    }
    o
}

#[cfg(test)]
mod tests {
    use super::super::config::parse;
    use super::*;

    /// The module documentation's example (every kind of section) and the built-in default
    /// come back unchanged through `to_toml` and the loader.
    #[test]
    fn configurations_round_trip() {
        let source = include_str!("config.rs");
        let doc: String = source
            .lines()
            .take_while(|l| l.starts_with("//!"))
            .map(|l| {
                format!(
                    "{}\n",
                    l.trim_start_matches("//!").strip_prefix(' ').unwrap_or("")
                )
            })
            .collect();
        let start = doc.find("```toml\n").unwrap() + "```toml\n".len();
        let len = doc[start..].find("```").unwrap();
        let mut example = parse(&doc[start..start + len], "doc").unwrap();
        example.initiator_groups[0].netmasks.push(Netmask::Cidr {
            addr: "fd00::".parse().unwrap(),
            prefix: 8,
        });
        example.targets[0].alias = Some("a \"quoted\" alias".into());
        example.auth_groups.push(super::super::AuthGroup {
            tag: 4,
            secrets: vec![
                crate::iscsi::chap::ChapSecret {
                    user: "alice".into(),
                    secret: b"twelve bytes \"ok\"".to_vec(),
                    mutual_user: Some("tgt".into()),
                    mutual_secret: Some(b"another-secret".to_vec()),
                },
                crate::iscsi::chap::ChapSecret {
                    user: "bob".into(),
                    secret: b"bob-secret-123".to_vec(),
                    mutual_user: None,
                    mutual_secret: None,
                },
            ],
        });
        example.discovery_auth.group = Some(4);
        example.discovery_auth.require_chap = true;
        example.targets[0].auth.group = Some(4);
        example.targets[0].auth.mutual_chap = true;
        // Found by the config fuzzer: a [dpdk] section without lists saved empty ones.
        let bare_dpdk = parse(
            &(to_toml(&super::super::config::default_config(None)) + "\n[dpdk]\nno_huge = true\n"),
            "dpdk",
        )
        .unwrap();
        assert!(bare_dpdk.dpdk.as_ref().unwrap().eal_args.is_empty());
        for c in [
            example,
            super::super::config::default_config(None),
            bare_dpdk,
        ] {
            let text = to_toml(&c);
            let back = parse(&text, "saved").unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(back, c, "{text}");
        }
    }
}
