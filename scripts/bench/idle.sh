#!/usr/bin/env bash
# Idle check: start iscsi-tgt (pinned to CPU 0), open 100 logged-in sessions that stay idle,
# and report the target's CPU% of one core over a 10 s window. The bar is < 2 %.
#
#   scripts/bench/idle.sh [--sessions N] [--window S] [--with-tgtd]
#
#   --with-tgtd   also measure tgtd the same way, for comparison
#
# Port: BENCH_PORT_BASE+3 (iscsi-tgt) and +2 (tgtd), default 3293/3292.
# Exit status: 0 below the bar, 1 above it, other on errors.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "${HERE}/lib.sh"

SESSIONS=100
WINDOW=10
WITH_TGTD=""
while [[ $# -gt 0 ]]; do
    case "$1" in
    --sessions) SESSIONS="${2:?}"; shift 2 ;;
    --window) WINDOW="${2:?}"; shift 2 ;;
    --with-tgtd) WITH_TGTD=1; shift ;;
    -h | --help) sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
    esac
done

PORT_BASE="${BENCH_PORT_BASE:-3290}"
OURS_PORT=$((PORT_BASE + 3))
TGTD_PORT=$((PORT_BASE + 2))
bench_prereqs

WORK="$(mktemp -d /tmp/iscsi-idle.XXXXXX)"
BENCH_FILES+=("${WORK}")
trap bench_cleanup EXIT
trap 'exit 130' INT TERM

start_ours "${OURS_PORT}" "${WORK}"
targets=(--target "ours:${OURS_PID}:${OURS_PORT}")
if [[ -n "${WITH_TGTD}" ]]; then
    start_tgtd "${TGTD_PORT}" "${WORK}"
    targets+=(--target "tgtd:${TGTD_PID}:${TGTD_PORT}")
fi
python3 "${HERE}/idle.py" --iqn "${BENCH_IQN}" --sessions "${SESSIONS}" --window "${WINDOW}" \
    "${targets[@]}" --out "${WORK}/idle.json"
