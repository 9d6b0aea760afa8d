# Shared helpers for scripts/bench/*.sh: start/stop iscsi-tgt and tgtd, pinned, on loopback.
# Source it; it defines functions only (plus REPO_ROOT, FIO, TGT_BIN, BENCH_IQN).
# shellcheck shell=bash

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
FIO="${REPO_ROOT}/.deps/bin/fio"
TGT_BIN="${TGT_BIN:-${REPO_ROOT}/target/release/iscsi-tgt}"
BENCH_IQN="iqn.2026-11.io.iscsi-tgt:bench"
BENCH_LUN_SIZE_MIB=1024
TARGET_CPU="${TARGET_CPU:-0}"
FIO_CPU="${FIO_CPU:-1}"

# Pids and files this script created (only these are ever killed/removed).
BENCH_PIDS=()
BENCH_FILES=()

die() {
    echo "bench: ERROR: $*" >&2
    exit 1
}
log() { echo "bench: $*" >&2; }

bench_cleanup() {
    local pid
    for pid in "${BENCH_PIDS[@]}"; do
        kill -TERM "${pid}" 2>/dev/null || true
    done
    for pid in "${BENCH_PIDS[@]}"; do
        for _ in $(seq 50); do
            kill -0 "${pid}" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "${pid}" 2>/dev/null || true
        wait "${pid}" 2>/dev/null || true
    done
    BENCH_PIDS=()
    local f
    for f in "${BENCH_FILES[@]}"; do
        rm -rf -- "${f}"
    done
    BENCH_FILES=()
}

# Make sure the binaries exist; build iscsi-tgt only when it is missing.
bench_prereqs() {
    bash "${REPO_ROOT}/scripts/deps.sh" || die "scripts/deps.sh failed"
    [[ -x "${FIO}" ]] || die "${FIO} missing after scripts/deps.sh"
    "${FIO}" --enghelp 2>/dev/null | grep -qw libiscsi || die "${FIO} lacks the libiscsi engine"
    if ! command -v tgtd >/dev/null || ! command -v tgtadm >/dev/null; then
        die "tgtd/tgtadm not found (Debian package 'tgt')"
    fi
    if [[ ! -x "${TGT_BIN}" ]]; then
        log "${TGT_BIN} missing: building it (cargo build --release -p dataplane)"
        (cd "${REPO_ROOT}" && cargo build --release -p dataplane) || die "cargo build failed"
    fi
    [[ $(nproc) -ge 2 ]] || die "need at least 2 CPUs (target on CPU ${TARGET_CPU}, fio on CPU ${FIO_CPU})"
}

# wait_port PORT PID NAME: wait until 127.0.0.1:PORT accepts connections (max 20 s).
wait_port() {
    local port="$1" pid="$2" name="$3"
    for _ in $(seq 200); do
        kill -0 "${pid}" 2>/dev/null || die "${name} exited during startup (see its log)"
        if (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    die "${name} does not accept connections on 127.0.0.1:${port} after 20 s"
}

# ours_config: the benchmark target's configuration without its portal group (tag 1, which
# the caller appends): 1 GiB malloc bdev, 512-byte blocks, LUN 0 of BENCH_IQN.
ours_config() {
    cat <<TOML
[global]
log_level = "warn"

[[initiator_group]]
tag = 1
initiators = ["ANY"]
netmasks = ["ANY"]

[[bdev]]
name = "Malloc0"
type = "malloc"
size = "${BENCH_LUN_SIZE_MIB}MiB"
block_size = 512

[[target]]
name = "${BENCH_IQN}"
luns = [ { lun = 0, bdev = "Malloc0" } ]
mappings = [ { portal_group = 1, initiator_group = 1 } ]
TOML
}

# start_ours PORT WORKDIR: sets OURS_PID. ours_config on 127.0.0.1:PORT.
start_ours() {
    local port="$1" dir="$2"
    local cfg="${dir}/iscsi-tgt.toml"
    {
        ours_config
        printf '\n[[portal_group]]\ntag = 1\nportals = ["127.0.0.1:%s"]\n' "${port}"
    } >"${cfg}"
    "${TGT_BIN}" --config "${cfg}" --check >/dev/null || die "iscsi-tgt rejects ${cfg}"
    local extra=()
    if "${TGT_BIN}" --help 2>&1 | grep -q -- '--cpumask'; then
        extra=(--cpumask "0x$(printf '%x' $((1 << TARGET_CPU)))")
    fi
    if "${TGT_BIN}" --help 2>&1 | grep -q -- '--instance'; then
        extra+=(--instance "bench-${port}")
    fi
    # shellcheck disable=SC2034 # used by run.sh
    OURS_CMD="taskset -c ${TARGET_CPU} ${TGT_BIN} --config ${cfg} ${extra[*]}"
    taskset -c "${TARGET_CPU}" "${TGT_BIN}" --config "${cfg}" "${extra[@]}" \
        >"${dir}/iscsi-tgt.log" 2>&1 &
    OURS_PID=$!
    BENCH_PIDS+=("${OURS_PID}")
    wait_port "${port}" "${OURS_PID}" "iscsi-tgt"
    log "iscsi-tgt pid ${OURS_PID} on 127.0.0.1:${port} (CPU ${TARGET_CPU}) ${extra[*]}"
}

# start_tgtd PORT WORKDIR: sets TGTD_PID and TGTD_BACKING. LUN 1 on a 1 GiB /dev/shm file,
# pre-written with zeros so no page is first touched during a measurement.
start_tgtd() {
    local port="$1" dir="$2"
    local ctl="${port}" # tgtd control socket /var/run/tgtd/socket.N
    TGTD_BACKING="/dev/shm/iscsi-bench-tgtd-$$-${port}.img"
    BENCH_FILES+=("${TGTD_BACKING}")
    truncate -s "${BENCH_LUN_SIZE_MIB}M" "${TGTD_BACKING}"
    dd if=/dev/zero of="${TGTD_BACKING}" bs=1M count="${BENCH_LUN_SIZE_MIB}" conv=notrunc \
        status=none || die "cannot pre-write ${TGTD_BACKING}"
    # shellcheck disable=SC2034 # used by run.sh
    TGTD_CMD="taskset -c ${TARGET_CPU} tgtd -f --iscsi portal=127.0.0.1:${port} -C ${ctl}"
    taskset -c "${TARGET_CPU}" tgtd -f --iscsi "portal=127.0.0.1:${port}" -C "${ctl}" \
        >"${dir}/tgtd.log" 2>&1 &
    TGTD_PID=$!
    BENCH_PIDS+=("${TGTD_PID}")
    local ok=""
    for _ in $(seq 100); do
        kill -0 "${TGTD_PID}" 2>/dev/null || die "tgtd exited during startup: $(tail -5 "${dir}/tgtd.log")"
        if tgtadm -C "${ctl}" --lld iscsi --op show --mode target >/dev/null 2>&1; then
            ok=1
            break
        fi
        sleep 0.1
    done
    [[ -n "${ok}" ]] || die "tgtd control socket ${ctl} not ready after 10 s"
    tgtadm -C "${ctl}" --lld iscsi --op new --mode target --tid 1 -T "${BENCH_IQN}" ||
        die "tgtadm: new target"
    tgtadm -C "${ctl}" --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "${TGTD_BACKING}" ||
        die "tgtadm: new logicalunit"
    tgtadm -C "${ctl}" --lld iscsi --op bind --mode target --tid 1 -I ALL || die "tgtadm: bind"
    wait_port "${port}" "${TGTD_PID}" "tgtd"
    log "tgtd pid ${TGTD_PID} on 127.0.0.1:${port} (CPU ${TARGET_CPU}), LUN 1 on ${TGTD_BACKING}"
}
