#!/usr/bin/env bash
# Kernel TCP vs DPDK (smoltcp over net_af_packet) on one wire: the same fio matrix against
# iscsi-tgt with `transport = "kernel"` and with `transport = "dpdk"`, over one veth pair in
# a network namespace this script creates (and deletes), fio on the kernel side.
#
#   scripts/bench/transports.sh [--quick] [--runtime S] [--reps N] [--only CASE,CASE] [--out DIR]
#
#   --quick       2 s per run, 1 repetition
#   --runtime S   seconds per fio run (default 10)
#   --reps N      repetitions per case (default 3); medians are reported
#   --only LIST   comma-separated case names (default: the 4K QD1/QD32 and 128K cases)
#   --out DIR     where results go (default docs/bench/transports)
#
# Needs root and an iscsi-tgt built with `--features dpdk` (built here when the binary lacks
# it). Each target runs alone, pinned to CPU 0 (one reactor), fio pinned to CPU 1. Writes
# DIR/results.md (printed too) and DIR/results.json.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "${HERE}/lib.sh"

CMDLINE="scripts/bench/transports.sh${*:+ $*}"
RUNTIME=10
REPS=3
ONLY="randread-4k-qd1,randread-4k-qd32,randwrite-4k-qd32,read-128k-qd8,write-128k-qd8"
OUT_DIR="${REPO_ROOT}/docs/bench/transports"
while [[ $# -gt 0 ]]; do
    case "$1" in
    --quick) RUNTIME=2; REPS=1; shift ;;
    --runtime) RUNTIME="${2:?--runtime needs a value}"; shift 2 ;;
    --reps) REPS="${2:?--reps needs a value}"; shift 2 ;;
    --only) ONLY="${2:?--only needs a value}"; shift 2 ;;
    --out) OUT_DIR="${2:?--out needs a value}"; shift 2 ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
    esac
done
[[ "${RUNTIME}" =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive integer"
[[ "${REPS}" =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer"
[[ "$(id -u)" -eq 0 ]] || die "run as root (network namespace, DPDK)"

bench_prereqs
if ! "${TGT_BIN}" --version | grep -q dpdk; then
    log "${TGT_BIN} has no DPDK transport: building it with --features dpdk"
    (cd "${REPO_ROOT}" && cargo build --release -p dataplane --features dpdk) || die "cargo build failed"
fi

NS="iscsi-bench-wire-$$"
KDEV=bwire0   # kernel side: fio's address
TDEV=bwire1   # target side: the kernel target's address, and DPDK's AF_PACKET port
WORK="$(mktemp -d /tmp/iscsi-bench-transports.XXXXXX)"
BENCH_FILES+=("${WORK}")
cleanup() {
    bench_cleanup
    ip netns del "${NS}" 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM

in_ns() { ip netns exec "${NS}" "$@"; }
ip netns add "${NS}"
in_ns ip link set lo up
in_ns ip link add "${KDEV}" type veth peer name "${TDEV}"
in_ns ip addr add 10.91.0.1/24 dev "${KDEV}"
# The kernel transport's portal; the DPDK stack has its own address (10.91.0.2) on the same
# wire. Checksum offloads off on both ends: AF_PACKET hands DPDK frames as they are.
in_ns ip addr add 10.91.0.3/24 dev "${TDEV}"
for d in "${KDEV}" "${TDEV}"; do
    in_ns ethtool -K "${d}" tx off rx off >/dev/null
    in_ns ip link set "${d}" up
done

{
    ours_config
    cat <<TOML
[[portal_group]]
tag = 1
portals = ["10.91.0.3:3260"]
TOML
} >"${WORK}/kernel.toml"
{
    ours_config
    cat <<TOML
[[portal_group]]
tag = 1
portals = ["10.91.0.2:3260"]
transport = "dpdk"
[portal_group.userspace]
device = "net_af_packet0"
addresses = ["10.91.0.2/24"]

[dpdk]
no_huge = true
memory_mib = 512
eal_args = ["--no-pci", "--vdev=net_af_packet0,iface=${TDEV}"]
TOML
} >"${WORK}/dpdk.toml"

meta=(
    "command=${CMDLINE}"
    "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    "nproc=$(nproc)"
    "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    "kernel=$(uname -srm)"
    "target_cpu=${TARGET_CPU}"
    "fio_cpu=${FIO_CPU}"
)

# run_one NAME HOST: start the target on its config, run the matrix, stop it.
run_one() {
    local name="$1" host="$2"
    local cmd=(ip netns exec "${NS}" taskset -c "${TARGET_CPU}" "${TGT_BIN}"
        --config "${WORK}/${name}.toml" --cpumask "0x$(printf '%x' $((1 << TARGET_CPU)))"
        --instance "bench-${name}-$$")
    meta+=("${name}_cmd=${cmd[*]}")
    "${cmd[@]}" >"${WORK}/${name}.log" 2>&1 &
    local pid=$!
    BENCH_PIDS+=("${pid}")
    local up=""
    for _ in $(seq 100); do
        kill -0 "${pid}" 2>/dev/null || die "${name} target exited: $(cat "${WORK}/${name}.log")"
        if in_ns timeout 2 bash -c "exec 3<>/dev/tcp/${host}/3260" 2>/dev/null; then
            up=1
            break
        fi
        sleep 0.2
    done
    [[ -n "${up}" ]] || die "${name} target does not accept connections on ${host}:3260"
    log "${name}: pid ${pid} on ${host}:3260"
    python3 "${HERE}/bench.py" run --fio "${FIO}" --iqn "${BENCH_IQN}" --netns "${NS}" \
        --targets "${name}:${pid}:3260:0:${host}" \
        --runtime "${RUNTIME}" --reps "${REPS}" --fio-cpu "${FIO_CPU}" --workdir "${WORK}" \
        --only "${ONLY}" --out "${WORK}/${name}.json" --meta "${meta[@]}"
    bench_cleanup_pid "${pid}"
}

bench_cleanup_pid() {
    local pid="$1"
    kill -TERM "${pid}" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "${pid}" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "${pid}" 2>/dev/null || true
    wait "${pid}" 2>/dev/null || true
}

run_one kernel 10.91.0.3
run_one dpdk 10.91.0.2

mkdir -p "${OUT_DIR}"
python3 "${HERE}/bench.py" transports --kernel "${WORK}/kernel.json" --dpdk "${WORK}/dpdk.json" \
    --md "${OUT_DIR}/results.md" --json "${OUT_DIR}/results.json"
log "wrote ${OUT_DIR}/results.md, ${OUT_DIR}/results.json"
