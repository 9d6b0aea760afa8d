#!/usr/bin/env bash
# The appliance's host set-up: hugepages, hugetlbfs, and NICs / NVMe drives handed to
# DPDK-capable drivers (vfio-pci, or uio_pci_generic without an IOMMU), and all of it given
# back.
#
#   setup.sh [--root DIR] [--dry-run] [--force] config [options] [DEVICE ...]
#   setup.sh [--root DIR] [--dry-run] reset
#   setup.sh [--root DIR] status
#
# config options (each also from the environment):
#   --hugepages N        2 MiB pages to reserve (HUGEPAGES_2M; default 1024 = 2 GiB)
#   --hugepages-1g N     1 GiB pages to reserve (HUGEPAGES_1G; default 0)
#   --node N             reserve on this NUMA node only (HUGE_NODE; default: the system-wide
#                        count, which the kernel spreads over the nodes)
#   --driver NAME        vfio-pci | uio_pci_generic (DPDK_DRIVER; default vfio-pci when
#                        the IOMMU is on, else uio_pci_generic)
#   --mount DIR          hugetlbfs mount point (HUGE_MOUNT; default /dev/hugepages)
# DEVICE: a PCI address (0000:3b:00.0 or 3b:00.0), a network interface (eth1) or an NVMe
# controller (nvme0); also DEVICES="..." from the environment.
#
# Safety: a NIC that carries the default route, or an NVMe drive with a mounted filesystem,
# is not taken unless --force. What config changed (original drivers, hugepage counts,
# the mount) is remembered in <root>/var/lib/iscsi-tgt/setup.state; reset gives it back.
#
# --root DIR runs against a fake sysfs/procfs tree (DIR/sys, DIR/proc): nothing is loaded,
# mounted or bound for real, the files are written as the kernel's would be (tests).
# --dry-run prints every action without doing it.
set -euo pipefail

ROOT=""
DRY=0
FORCE=0

die() {
    echo "setup.sh: $*" >&2
    exit 1
}

say() { echo "setup.sh: $*"; }

# act DESCRIPTION CMD...: do (or, dry, print) an action.
act() {
    local what="$1"
    shift
    if ((DRY)); then
        echo "would: ${what}"
    else
        echo "${what}"
        "$@"
    fi
}

# write VALUE FILE: a sysfs write.
write() {
    local value="$1" file="$2"
    act "echo ${value} > ${file#"${ROOT}"}" sh -c 'printf "%s\n" "$1" > "$2"' _ "${value}" "${file}"
}

sys() { echo "${ROOT}/sys$1"; }
proc() { echo "${ROOT}/proc$1"; }
state_file() { echo "${ROOT}/var/lib/iscsi-tgt/setup.state"; }

remember() {
    ((DRY)) && return 0
    mkdir -p "$(dirname "$(state_file)")"
    echo "$*" >>"$(state_file)"
}

# ---------------------------------------------------------------- devices

# A PCI address in full form, from an address, an interface or an NVMe controller name.
pci_of() {
    local d="$1"
    if [[ "$d" =~ ^[0-9a-fA-F]{4}:[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$ ]]; then
        echo "${d,,}"
    elif [[ "$d" =~ ^[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$ ]]; then
        echo "0000:${d,,}"
    elif [[ -e "$(sys /class/net/"$d")/device" ]]; then
        basename "$(readlink -f "$(sys /class/net/"$d")/device")"
    elif [[ -e "$(sys /class/nvme/"$d")/device" ]]; then
        basename "$(readlink -f "$(sys /class/nvme/"$d")/device")"
    else
        return 1
    fi
}

dev_dir() { sys "/bus/pci/devices/$1"; }

driver_of() {
    local link
    link="$(dev_dir "$1")/driver"
    if [[ -L "$link" ]]; then basename "$(readlink "$link")"; else echo "-"; fi
}

numa_of() {
    local f
    f="$(dev_dir "$1")/numa_node"
    if [[ -r "$f" ]]; then cat "$f"; else echo "-1"; fi
}

# Network interfaces and NVMe controllers a PCI device has now.
ifaces_of() { ls "$(dev_dir "$1")/net" 2>/dev/null || true; }
nvmes_of() { ls "$(dev_dir "$1")/nvme" 2>/dev/null || true; }

class_of() { cat "$(dev_dir "$1")/class" 2>/dev/null || echo "0x000000"; }
is_net() { [[ "$(class_of "$1")" == 0x02* ]]; }
is_nvme() { [[ "$(class_of "$1")" == 0x010802 ]]; }

iommu_on() { [[ -n "$(ls -A "$(sys /kernel/iommu_groups)" 2>/dev/null)" ]]; }

# Interfaces carrying a default route (IPv4 routing table).
default_route_ifaces() {
    [[ -r "$(proc /net/route)" ]] || return 0
    awk 'NR > 1 && $2 == "00000000" { print $1 }' "$(proc /net/route)"
}

# Mounted block devices' names (nvme0n1p2, ...).
mounted_devices() {
    [[ -r "$(proc /mounts)" ]] || return 0
    awk '$1 ~ "^/dev/" { sub("^/dev/", "", $1); print $1 }' "$(proc /mounts)"
}

# Why a device must not be taken (empty when it may).
refusal() {
    local pci="$1" i n
    for i in $(ifaces_of "$pci"); do
        if default_route_ifaces | grep -qx "$i"; then
            echo "interface $i carries the default route"
            return
        fi
    done
    for n in $(nvmes_of "$pci"); do
        if mounted_devices | grep -q "^${n}n[0-9]"; then
            echo "NVMe $n has a mounted filesystem ($(mounted_devices | grep "^${n}n" | tr '\n' ' '))"
            return
        fi
    done
}

load_module() {
    local m="$1"
    if [[ -n "$ROOT" ]]; then
        echo "(fake root) modprobe ${m}"
        return
    fi
    [[ -d "/sys/bus/pci/drivers/${m}" ]] && return
    act "modprobe ${m}" modprobe "${m}"
}

bind() {
    local pci="$1" driver="$2" cur reason
    cur="$(driver_of "$pci")"
    if [[ "$cur" == "$driver" ]]; then
        say "${pci}: already on ${driver}"
        return
    fi
    reason="$(refusal "$pci")"
    if [[ -n "$reason" ]]; then
        ((FORCE)) || die "${pci}: ${reason}: not taken (--force to take it anyway)"
        say "${pci}: ${reason}: taken anyway (--force)"
    fi
    remember "bind ${pci} ${cur}"
    if [[ "$cur" != "-" ]]; then
        write "$pci" "$(dev_dir "$pci")/driver/unbind"
    fi
    write "$driver" "$(dev_dir "$pci")/driver_override"
    write "$pci" "$(sys /bus/pci/drivers/"$driver")/bind"
}

# ---------------------------------------------------------------- hugepages

hp_dir() {
    local size_kb="$1" node="$2"
    if [[ -n "$node" ]]; then
        sys "/devices/system/node/node${node}/hugepages/hugepages-${size_kb}kB"
    else
        sys "/kernel/mm/hugepages/hugepages-${size_kb}kB"
    fi
}

reserve() {
    local size_kb="$1" count="$2" node="$3" dir prev got
    dir="$(hp_dir "$size_kb" "$node")"
    [[ -d "$dir" ]] || die "no ${size_kb} kB hugepages${node:+ on node ${node}} on this machine ($dir)"
    prev="$(cat "$dir/nr_hugepages")"
    [[ "$prev" == "$count" ]] && {
        say "${size_kb} kB hugepages${node:+ on node ${node}}: ${count} already"
        return
    }
    remember "hugepages ${size_kb} ${node:--} ${prev}"
    write "$count" "$dir/nr_hugepages"
    if ((!DRY)) && [[ -z "$ROOT" ]]; then
        got="$(cat "$dir/nr_hugepages")"
        [[ "$got" == "$count" ]] ||
            say "warning: asked for ${count} ${size_kb} kB hugepages, the kernel gave ${got} (memory fragmented?)"
    fi
}

mount_hugetlbfs() {
    local dir="$1"
    if [[ -r "$(proc /mounts)" ]] && awk -v d="$dir" '$2 == d && $3 == "hugetlbfs"' "$(proc /mounts)" | grep -q .; then
        say "hugetlbfs already mounted on ${dir}"
        return
    fi
    remember "mount ${dir}"
    if [[ -n "$ROOT" ]]; then
        act "(fake root) mount -t hugetlbfs nodev ${dir}" mkdir -p "${ROOT}${dir}"
        return
    fi
    act "mkdir -p ${dir}" mkdir -p "$dir"
    act "mount -t hugetlbfs nodev ${dir}" mount -t hugetlbfs nodev "$dir"
}

# ---------------------------------------------------------------- commands

cmd_config() {
    local n2="${HUGEPAGES_2M:-1024}" n1g="${HUGEPAGES_1G:-0}" node="${HUGE_NODE:-}"
    local driver="${DPDK_DRIVER:-}" mnt="${HUGE_MOUNT:-/dev/hugepages}"
    local devices=()
    read -r -a devices <<<"${DEVICES:-}"
    while (($#)); do
        case "$1" in
        --hugepages) n2="${2:?--hugepages needs a count}"; shift 2 ;;
        --hugepages-1g) n1g="${2:?--hugepages-1g needs a count}"; shift 2 ;;
        --node) node="${2:?--node needs a number}"; shift 2 ;;
        --driver) driver="${2:?--driver needs a name}"; shift 2 ;;
        --mount) mnt="${2:?--mount needs a directory}"; shift 2 ;;
        -*) die "config: unknown option $1" ;;
        *) devices+=("$1"); shift ;;
        esac
    done
    [[ "$n2" =~ ^[0-9]+$ && "$n1g" =~ ^[0-9]+$ ]] || die "hugepage counts are whole numbers"
    [[ -z "$node" || "$node" =~ ^[0-9]+$ ]] || die "--node: a NUMA node number"
    if [[ -z "$driver" ]]; then
        if iommu_on; then driver=vfio-pci; else driver=uio_pci_generic; fi
    fi
    case "$driver" in
    vfio-pci | uio_pci_generic) ;;
    *) die "--driver: vfio-pci or uio_pci_generic" ;;
    esac
    if [[ "$driver" == vfio-pci ]] && ! iommu_on; then
        say "warning: vfio-pci without an IOMMU needs vfio's no-IOMMU mode; uio_pci_generic is the usual choice"
    fi
    # Resolve and check every device before changing anything.
    local pcis=() d pci reason
    for d in "${devices[@]}"; do
        pci="$(pci_of "$d")" || die "${d}: no such PCI address, interface or NVMe controller"
        [[ -d "$(dev_dir "$pci")" ]] || die "${d}: no PCI device ${pci}"
        reason="$(refusal "$pci")"
        if [[ -n "$reason" ]] && ((!FORCE)); then
            die "${d} (${pci}): ${reason}: not taken (--force to take it anyway)"
        fi
        pcis+=("$pci")
    done
    reserve 2048 "$n2" "$node"
    if ((n1g > 0)); then
        reserve 1048576 "$n1g" "$node"
    fi
    mount_hugetlbfs "$mnt"
    if ((${#pcis[@]})); then
        load_module "$driver"
        for pci in "${pcis[@]}"; do
            bind "$pci" "$driver"
        done
    fi
}

cmd_reset() {
    local f
    f="$(state_file)"
    if [[ ! -s "$f" ]]; then
        say "nothing to give back (no ${f#"${ROOT}"})"
        return
    fi
    # Newest first: undo in the reverse order of doing.
    local line kind a b c
    while read -r line; do
        read -r kind a b c <<<"$line"
        case "$kind" in
        bind)
            local cur
            cur="$(driver_of "$a")"
            if [[ "$cur" != "-" ]]; then
                write "$a" "$(dev_dir "$a")/driver/unbind"
            fi
            write "" "$(dev_dir "$a")/driver_override"
            if [[ "$b" != "-" ]]; then
                write "$a" "$(sys /bus/pci/drivers/"$b")/bind"
            fi
            ;;
        hugepages)
            local node=""
            [[ "$b" != "-" ]] && node="$b"
            write "$c" "$(hp_dir "$a" "$node")/nr_hugepages"
            ;;
        mount)
            if [[ -n "$ROOT" ]]; then
                echo "(fake root) umount ${a}"
            else
                act "umount ${a}" umount "$a"
            fi
            ;;
        esac
    done < <(tac "$f")
    ((DRY)) || rm -f "$f"
}

cmd_status() {
    echo "hugepages:"
    local d node size
    for d in "$(sys /kernel/mm/hugepages)"/hugepages-*; do
        [[ -d "$d" ]] || continue
        size="${d##*hugepages-}"
        printf "  %-12s total %6s free %6s\n" "$size" "$(cat "$d/nr_hugepages")" "$(cat "$d/free_hugepages" 2>/dev/null || echo -)"
    done
    for node in "$(sys /devices/system/node)"/node[0-9]*; do
        [[ -d "$node/hugepages" ]] || continue
        for d in "$node"/hugepages/hugepages-*; do
            size="${d##*hugepages-}"
            printf "  %-6s %-5s total %6s free %6s\n" "$(basename "$node")" "$size" "$(cat "$d/nr_hugepages")" "$(cat "$d/free_hugepages" 2>/dev/null || echo -)"
        done
    done
    if iommu_on; then
        echo "iommu: on ($(ls "$(sys /kernel/iommu_groups)" | wc -l) groups)"
    else
        echo "iommu: off (uio_pci_generic, or vfio-pci in no-IOMMU mode)"
    fi
    echo "devices:"
    printf "  %-14s %-5s %-16s %-5s %-6s %s\n" "PCI" "kind" "driver" "numa" "dpdk" "names"
    local pci kind drv names dpdk
    for d in "$(sys /bus/pci/devices)"/*; do
        [[ -e "$d" ]] || continue
        pci="$(basename "$d")"
        if is_net "$pci"; then kind=net; elif is_nvme "$pci"; then kind=nvme; else continue; fi
        drv="$(driver_of "$pci")"
        case "$drv" in vfio-pci | uio_pci_generic | igb_uio) dpdk=yes ;; *) dpdk=no ;; esac
        names="$(ifaces_of "$pci") $(nvmes_of "$pci")"
        printf "  %-14s %-5s %-16s %-5s %-6s %s\n" "$pci" "$kind" "$drv" "$(numa_of "$pci")" "$dpdk" "$(echo $names)"
    done
    if [[ -s "$(state_file)" ]]; then
        echo "changed by setup.sh config (reset gives back):"
        sed 's/^/  /' "$(state_file)"
    fi
}

main() {
    while (($#)); do
        case "$1" in
        --root) ROOT="${2:?--root needs a directory}"; ROOT="${ROOT%/}"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        --force) FORCE=1; shift ;;
        -h | --help) sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) break ;;
        esac
    done
    local cmd="${1:-}"
    shift || true
    if [[ -z "$ROOT" && "$cmd" != status && "$(id -u)" -ne 0 ]] && ((!DRY)); then
        die "${cmd}: run as root (or --dry-run)"
    fi
    case "$cmd" in
    config) cmd_config "$@" ;;
    reset) cmd_reset ;;
    status) cmd_status ;;
    *) die "usage: setup.sh [--root DIR] [--dry-run] [--force] config|reset|status (--help)" ;;
    esac
}

main "$@"
