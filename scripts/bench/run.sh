#!/usr/bin/env bash
# Benchmark iscsi-tgt against tgtd, side by side, over loopback, with fio's libiscsi engine.
#
#   scripts/bench/run.sh [--quick] [--runtime S] [--reps N] [--only CASE,CASE] [--no-idle]
#
#   --quick       2 s per run, 1 repetition (smoke test)
#   --runtime S   seconds per fio run (default 10)
#   --reps N      repetitions per case and target (default 3); medians are reported
#   --only LIST   comma-separated case names (see CASES in bench.py)
#   --no-idle     skip the 100-idle-sessions CPU check
#   --out DIR     where results go (default docs/bench)
#
# Both targets run for the whole benchmark pinned to CPU 0 (taskset -c 0); fio runs pinned to
# CPU 1. Each case runs against tgtd and iscsi-tgt alternately. Ports: BENCH_PORT_BASE (tgtd)
# and BENCH_PORT_BASE+1 (iscsi-tgt), default 3290/3291.
#
# Writes DIR/results.md (printed too), DIR/results.json (every run, medians, ratios) and
# DIR/chart.png (ratios ours/tgtd per case, line at 1.0).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "${HERE}/lib.sh"

CMDLINE="scripts/bench/run.sh${*:+ $*}"
RUNTIME=10
REPS=3
ONLY=""
IDLE=1
OUT_DIR="${REPO_ROOT}/docs/bench"
while [[ $# -gt 0 ]]; do
    case "$1" in
    --quick) RUNTIME=2; REPS=1; shift ;;
    --runtime) RUNTIME="${2:?--runtime needs a value}"; shift 2 ;;
    --reps) REPS="${2:?--reps needs a value}"; shift 2 ;;
    --only) ONLY="${2:?--only needs a value}"; shift 2 ;;
    --no-idle) IDLE=""; shift ;;
    --out) OUT_DIR="${2:?--out needs a value}"; shift 2 ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
    esac
done
[[ "${RUNTIME}" =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a positive integer"
[[ "${REPS}" =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive integer"

PORT_BASE="${BENCH_PORT_BASE:-3290}"
TGTD_PORT="${PORT_BASE}"
OURS_PORT=$((PORT_BASE + 1))

bench_prereqs
python3 -c 'import matplotlib' 2>/dev/null || {
    log "installing matplotlib (pip) for the chart"
    python3 -m pip install -q matplotlib >/dev/null 2>&1 || die "pip install matplotlib failed"
}
for p in "${TGTD_PORT}" "${OURS_PORT}"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/${p}") 2>/dev/null; then
        die "port ${p} is already in use (set BENCH_PORT_BASE)"
    fi
done

WORK="$(mktemp -d /tmp/iscsi-bench.XXXXXX)"
BENCH_FILES+=("${WORK}")
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

start_tgtd "${TGTD_PORT}" "${WORK}"
start_ours "${OURS_PORT}" "${WORK}"

mkdir -p "${OUT_DIR}"
meta=(
    "command=${CMDLINE}"
    "date=$(date -u '+%Y-%m-%d %H:%M:%S UTC')"
    "nproc=$(nproc)"
    "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    "kernel=$(uname -srm)"
    "mem=$(free -g | awk '/^Mem:/ {print $2 " GiB RAM"}')"
    "git=$(cd "${REPO_ROOT}" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "${REPO_ROOT}" && git diff --quiet HEAD -- dataplane 2>/dev/null || echo ' (dataplane has local changes)')"
    "ours_version=$("${TGT_BIN}" --version 2>&1 | head -1), binary built $(date -u -r "${TGT_BIN}" '+%Y-%m-%d %H:%M UTC')"
    "tgtd_version=tgt $(dpkg-query -W -f='${Version}' tgt 2>/dev/null || echo '?')"
    "fio_version=$("${FIO}" --version)"
    "ours_cmd=${OURS_CMD}"
    "tgtd_cmd=${TGTD_CMD}"
    "target_cpu=${TARGET_CPU}"
    "fio_cpu=${FIO_CPU}"
)
log "fio matrix: ${RUNTIME} s per run, ${REPS} repetition(s)"
python3 "${HERE}/bench.py" run --fio "${FIO}" --iqn "${BENCH_IQN}" \
    --targets "tgtd:${TGTD_PID}:${TGTD_PORT}:1" "ours:${OURS_PID}:${OURS_PORT}:0" \
    --runtime "${RUNTIME}" --reps "${REPS}" --fio-cpu "${FIO_CPU}" --workdir "${WORK}" \
    --only "${ONLY}" --out "${WORK}/raw.json" --meta "${meta[@]}"

idle_args=()
if [[ -n "${IDLE}" ]]; then
    log "idle check: 100 logged-in idle sessions, 10 s window, each target in turn"
    # Exit status 1 = above the bar: reported in the table, not fatal here.
    python3 "${HERE}/idle.py" --iqn "${BENCH_IQN}" --sessions 100 --window 10 \
        --target "ours:${OURS_PID}:${OURS_PORT}" --target "tgtd:${TGTD_PID}:${TGTD_PORT}" \
        --out "${WORK}/idle.json" || [[ $? -eq 1 ]] || die "idle check failed"
    idle_args=(--idle "${WORK}/idle.json")
fi

python3 "${HERE}/bench.py" report --raw "${WORK}/raw.json" "${idle_args[@]}" \
    --md "${OUT_DIR}/results.md" --json "${OUT_DIR}/results.json" --png "${OUT_DIR}/chart.png"
log "wrote ${OUT_DIR}/results.md, ${OUT_DIR}/results.json, ${OUT_DIR}/chart.png"
