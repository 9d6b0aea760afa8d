//! `scripts/setup.sh` against a fake sysfs/procfs tree (two NICs, two NVMe drives, one NIC
//! carrying the default route, one drive with a mounted filesystem, an IOMMU, hugepages on
//! two NUMA nodes): status, config (hugepages per node, binding by interface name, NVMe
//! name and PCI address, the original drivers remembered), the refusals and --force,
//! --dry-run, and reset giving everything back. Then a real run of config / status / reset
//! for hugepages on this machine.

use e2e::{artifacts_dir, run_with_timeout, workspace_root};
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Fake {
    root: PathBuf,
}

fn put(p: &Path, text: &str) {
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

impl Fake {
    fn new(name: &str) -> Fake {
        let root = artifacts_dir().join(format!("fake-root-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let f = Fake { root };
        for d in ["ixgbe", "nvme", "vfio-pci", "uio_pci_generic"] {
            put(&f.driver(d).join("bind"), "");
            put(&f.driver(d).join("unbind"), "");
        }
        f.device("0000:3b:00.0", "0x020000", 0, "ixgbe", "net", "eth1");
        f.device("0000:3b:00.1", "0x020000", 1, "ixgbe", "net", "eth0");
        f.device("0000:5e:00.0", "0x010802", 0, "nvme", "nvme", "nvme0");
        f.device("0000:5f:00.0", "0x010802", 1, "nvme", "nvme", "nvme1");
        // Not a NIC or an NVMe drive: status leaves it out.
        put(&f.dev("0000:00:1f.0").join("class"), "0x060100\n");
        for node in [None, Some(0), Some(1)] {
            for size in ["2048kB", "1048576kB"] {
                let d = f.hugepages(node, size);
                put(&d.join("nr_hugepages"), "0\n");
                put(&d.join("free_hugepages"), "0\n");
            }
        }
        fs::create_dir_all(f.root.join("sys/kernel/iommu_groups/0")).unwrap();
        put(
            &f.root.join("proc/net/route"),
            "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
             eth0\t00000000\t0100A8C0\t0003\t0\t0\t100\t00000000\n\
             eth0\t0000A8C0\t00000000\t0001\t0\t0\t100\t00FFFFFF\n",
        );
        put(
            &f.root.join("proc/mounts"),
            "sysfs /sys sysfs rw 0 0\n/dev/nvme0n1p2 /data ext4 rw 0 0\n",
        );
        f
    }

    fn dev(&self, pci: &str) -> PathBuf {
        self.root.join("sys/bus/pci/devices").join(pci)
    }

    fn driver(&self, d: &str) -> PathBuf {
        self.root.join("sys/bus/pci/drivers").join(d)
    }

    fn hugepages(&self, node: Option<u32>, size: &str) -> PathBuf {
        match node {
            None => self.root.join("sys/kernel/mm/hugepages"),
            Some(n) => self
                .root
                .join(format!("sys/devices/system/node/node{n}/hugepages")),
        }
        .join(format!("hugepages-{size}"))
    }

    fn device(&self, pci: &str, class: &str, numa: u32, driver: &str, kind: &str, name: &str) {
        let d = self.dev(pci);
        put(&d.join("class"), &format!("{class}\n"));
        put(&d.join("numa_node"), &format!("{numa}\n"));
        put(&d.join("driver_override"), "(null)\n");
        symlink(self.driver(driver), d.join("driver")).unwrap();
        fs::create_dir_all(d.join(kind).join(name)).unwrap();
        let class_dir = self.root.join("sys/class").join(kind).join(name);
        fs::create_dir_all(&class_dir).unwrap();
        symlink(&d, class_dir.join("device")).unwrap();
    }

    fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.root.join(rel)).unwrap_or_default()
    }

    fn run(&self, args: &[&str]) -> (bool, String) {
        let mut cmd = Command::new("bash");
        cmd.arg(workspace_root().join("scripts/setup.sh"))
            .arg("--root")
            .arg(&self.root)
            .args(args);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
        (out.success(), format!("{}{}", out.stdout, out.stderr))
    }
}

#[test]
fn setup_against_a_fake_sysfs() {
    let f = Fake::new("a");
    let (ok, out) = f.run(&["status"]);
    assert!(ok, "{out}");
    assert!(out.contains("iommu: on (1 groups)"), "{out}");
    for line in [
        "0000:3b:00.0   net   ixgbe            0     no     eth1",
        "0000:3b:00.1   net   ixgbe            1     no     eth0",
        "0000:5e:00.0   nvme  nvme             0     no     nvme0",
    ] {
        assert!(out.contains(line), "{line:?} in\n{out}");
    }
    assert!(!out.contains("0000:00:1f.0"), "{out}");

    // Refusals change nothing: the NIC with the default route, the drive with /data on it,
    // an unknown device.
    let (ok, out) = f.run(&["config", "--hugepages", "64", "eth0"]);
    assert!(!ok && out.contains("carries the default route"), "{out}");
    let (ok, out) = f.run(&["config", "0000:5e:00.0"]);
    assert!(
        !ok && out.contains("nvme0 has a mounted filesystem"),
        "{out}"
    );
    let (ok, out) = f.run(&["config", "eth9"]);
    assert!(!ok && out.contains("eth9: no such"), "{out}");
    assert_eq!(
        f.read("sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
        "0\n"
    );
    assert!(f.read("var/lib/iscsi-tgt/setup.state").is_empty());

    // --dry-run prints every action and does none.
    let (ok, out) = f.run(&["--dry-run", "config", "--hugepages", "64", "eth1"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("would: echo 64 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
        "{out}"
    );
    assert!(
        out.contains("would: echo 0000:3b:00.0 > /sys/bus/pci/drivers/vfio-pci/bind"),
        "{out}"
    );
    assert_eq!(f.read("sys/bus/pci/drivers/vfio-pci/bind"), "");

    // config: 512 2 MiB pages and 2 1 GiB pages on node 1, hugetlbfs, eth1 and nvme1 to
    // vfio-pci (the IOMMU is on).
    let (ok, out) = f.run(&[
        "config",
        "--hugepages",
        "512",
        "--hugepages-1g",
        "2",
        "--node",
        "1",
        "eth1",
        "nvme1",
    ]);
    assert!(ok, "{out}");
    let node1 = "sys/devices/system/node/node1/hugepages";
    assert_eq!(
        f.read(&format!("{node1}/hugepages-2048kB/nr_hugepages")),
        "512\n"
    );
    assert_eq!(
        f.read(&format!("{node1}/hugepages-1048576kB/nr_hugepages")),
        "2\n"
    );
    assert_eq!(f.read("sys/bus/pci/drivers/ixgbe/unbind"), "0000:3b:00.0\n");
    assert_eq!(f.read("sys/bus/pci/drivers/nvme/unbind"), "0000:5f:00.0\n");
    assert_eq!(
        f.read("sys/bus/pci/devices/0000:3b:00.0/driver_override"),
        "vfio-pci\n"
    );
    // Each bind write replaces the file's contents, as the kernel's attribute would take it.
    assert_eq!(
        f.read("sys/bus/pci/drivers/vfio-pci/bind"),
        "0000:5f:00.0\n"
    );
    let state = f.read("var/lib/iscsi-tgt/setup.state");
    assert_eq!(
        state,
        "hugepages 2048 1 0\nhugepages 1048576 1 0\nmount /dev/hugepages\n\
         bind 0000:3b:00.0 ixgbe\nbind 0000:5f:00.0 nvme\n"
    );
    let (_, out) = f.run(&["status"]);
    assert!(out.contains("node1  2048kB total    512"), "{out}");
    assert!(out.contains("bind 0000:3b:00.0 ixgbe"), "{out}");

    // --force takes the NIC with the default route, uio_pci_generic on request.
    let (ok, out) = f.run(&[
        "--force",
        "config",
        "--hugepages",
        "0",
        "--driver",
        "uio_pci_generic",
        "3b:00.1",
    ]);
    assert!(ok && out.contains("taken anyway (--force)"), "{out}");
    assert_eq!(
        f.read("sys/bus/pci/drivers/uio_pci_generic/bind"),
        "0000:3b:00.1\n"
    );

    // reset: drivers back (newest first), hugepages back, the state forgotten.
    let (ok, out) = f.run(&["reset"]);
    assert!(ok, "{out}");
    assert_eq!(
        f.read(&format!("{node1}/hugepages-2048kB/nr_hugepages")),
        "0\n"
    );
    assert_eq!(
        f.read(&format!("{node1}/hugepages-1048576kB/nr_hugepages")),
        "0\n"
    );
    assert_eq!(f.read("sys/bus/pci/drivers/ixgbe/bind"), "0000:3b:00.0\n");
    assert_eq!(f.read("sys/bus/pci/drivers/nvme/bind"), "0000:5f:00.0\n");
    assert_eq!(
        f.read("sys/bus/pci/devices/0000:3b:00.0/driver_override"),
        "\n"
    );
    let order: Vec<&str> = out.lines().filter(|l| l.contains("/bind")).collect();
    assert_eq!(
        order,
        vec![
            "echo 0000:3b:00.1 > /sys/bus/pci/drivers/ixgbe/bind",
            "echo 0000:5f:00.0 > /sys/bus/pci/drivers/nvme/bind",
            "echo 0000:3b:00.0 > /sys/bus/pci/drivers/ixgbe/bind",
        ],
        "{out}"
    );
    assert!(f.read("var/lib/iscsi-tgt/setup.state").is_empty());
    let (ok, out) = f.run(&["reset"]);
    assert!(ok && out.contains("nothing to give back"), "{out}");
    let _ = fs::remove_dir_all(&f.root);
}

/// A real run on this machine: hugepages only (no device is touched), given back after.
#[test]
fn setup_reserves_and_returns_real_hugepages() {
    let nr = Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages");
    // SAFETY: geteuid has no preconditions.
    if !nr.exists() || unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: no 2 MiB hugepages or not root");
        return;
    }
    let before = fs::read_to_string(nr).unwrap();
    let want = before.trim().parse::<u64>().unwrap() + 16;
    let script = workspace_root().join("scripts/setup.sh");
    let state = Path::new("/var/lib/iscsi-tgt/setup.state");
    assert!(
        !state.exists(),
        "{} exists: an earlier setup.sh config was not reset",
        state.display()
    );
    let run = |args: &[&str]| {
        let mut cmd = Command::new("bash");
        cmd.arg(&script).args(args);
        let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
        (out.success(), format!("{}{}", out.stdout, out.stderr))
    };
    let (ok, out) = run(&["config", "--hugepages", &want.to_string()]);
    assert!(ok, "{out}");
    let (ok, status) = run(&["status"]);
    let reserved = fs::read_to_string(nr).unwrap();
    let (reset_ok, reset_out) = run(&["reset"]);
    assert!(ok, "{status}");
    assert!(reset_ok, "{reset_out}");
    assert_eq!(reserved.trim(), want.to_string(), "{out}");
    assert!(
        status.contains(&format!("2048kB       total {want:>6}")),
        "{status}"
    );
    assert_eq!(fs::read_to_string(nr).unwrap(), before, "{reset_out}");
    assert!(!state.exists());
}
